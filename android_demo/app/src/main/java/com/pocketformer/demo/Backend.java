package com.pocketformer.demo;

/**
 * A loaded sentence-encoder program: token ids and attention mask [batch, seq] (int64, row
 * major) in, the first output (float32) out. {@link OrtSession} is the ONNX Runtime backend
 * (our JNI layer over the C API); a Gradle build may add an ExecuTorch one (see README.md).
 */
public interface Backend {
    /** Runs the program; fills {@code shapeOut[0]} = rank and {@code shapeOut[1..]} = dims. */
    float[] run(long[] inputIds, long[] attentionMask, int batch, int seqLen, long[] shapeOut);

    /** The runtime and its version, e.g. "onnxruntime 1.29.0". */
    String runtimeVersion();

    void close();
}

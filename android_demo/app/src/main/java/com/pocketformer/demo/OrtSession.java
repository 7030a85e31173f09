package com.pocketformer.demo;

import java.nio.ByteBuffer;

/**
 * ONNX Runtime through our own JNI layer ({@code src/main/cpp/ort_jni.c}, library
 * {@code libpfdemo.so}) over ORT's C API; the runtime itself is the official
 * {@code libonnxruntime.so}. The same class runs on a phone and on the host JVM: on the host,
 * set the system property {@code pfdemo.lib} to the absolute path of a host build of
 * libpfdemo.so (linked against the Linux libonnxruntime.so).
 *
 * Load failures (missing file, not an ONNX model, an operator the runtime lacks) throw
 * {@link IllegalArgumentException}; other runtime failures throw {@link IllegalStateException}.
 */
public final class OrtSession implements Backend {
    private static boolean loaded;

    static synchronized void loadNative() {
        if (loaded) return;
        String lib = System.getProperty("pfdemo.lib");
        if (lib != null && lib.length() > 0) {
            System.load(lib);
        } else {
            System.loadLibrary("onnxruntime");
            System.loadLibrary("pfdemo");
        }
        loaded = true;
    }

    private long handle;
    private final String[] inputNames;
    private final String[] outputNames;

    private OrtSession(long handle) {
        this.handle = handle;
        this.inputNames = nativeInputNames(handle);
        this.outputNames = nativeOutputNames(handle);
    }

    /** Loads a model file. */
    public static OrtSession fromPath(String path, int threads) {
        loadNative();
        return new OrtSession(nativeCreate(path, threads));
    }

    /** Loads a model from a direct buffer (e.g. an uncompressed APK asset mapped read-only). */
    public static OrtSession fromBuffer(ByteBuffer direct, int threads) {
        loadNative();
        if (!direct.isDirect()) throw new IllegalArgumentException("buffer must be direct");
        return new OrtSession(nativeCreateFromBuffer(direct, direct.remaining(), threads));
    }

    public static String version() {
        loadNative();
        return nativeVersion();
    }

    public String[] inputNames() {
        return inputNames.clone();
    }

    public String[] outputNames() {
        return outputNames.clone();
    }

    @Override
    public float[] run(long[] inputIds, long[] attentionMask, int batch, int seqLen, long[] shapeOut) {
        if (handle == 0) throw new IllegalStateException("session is closed");
        if (inputIds.length != (long) batch * seqLen || attentionMask.length != (long) batch * seqLen) {
            throw new IllegalArgumentException("inputs must hold batch*seqLen values");
        }
        return nativeRun(handle, inputIds, attentionMask, batch, seqLen, shapeOut);
    }

    @Override
    public String runtimeVersion() {
        return "onnxruntime " + version();
    }

    @Override
    public synchronized void close() {
        if (handle != 0) {
            nativeClose(handle);
            handle = 0;
        }
    }

    private static native String nativeVersion();

    private static native long nativeCreate(String path, int threads);

    private static native long nativeCreateFromBuffer(ByteBuffer buffer, long length, int threads);

    private static native String[] nativeInputNames(long handle);

    private static native String[] nativeOutputNames(long handle);

    private static native float[] nativeRun(long handle, long[] inputIds, long[] attentionMask,
                                            int batch, int seqLen, long[] shapeOut);

    private static native void nativeClose(long handle);
}

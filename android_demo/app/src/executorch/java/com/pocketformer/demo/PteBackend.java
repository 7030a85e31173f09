package com.pocketformer.demo;

import org.pytorch.executorch.EValue;
import org.pytorch.executorch.Module;
import org.pytorch.executorch.Tensor;

/**
 * ExecuTorch backend for .pte artifacts, compiled only by the Gradle build with
 * {@code pocketformer.executorch=true} (org.pytorch:executorch-android). MainActivity finds it
 * by reflection; APKs from {@code pocketformer android-demo} do not contain it.
 *
 * NOT compiled or run on the pocketformer CI machine (the AAR's classes need d8/Gradle, which
 * are not reachable there): written against ExecuTorch's documented Java API (Module.load,
 * Module.forward, EValue, Tensor.fromBlob). The exported .pte has static shapes: pad to the
 * exported sequence length (128 for the MiniLM recipe) before calling run().
 */
public final class PteBackend implements Backend {
    private final Module module;

    private PteBackend(Module module) {
        this.module = module;
    }

    public static Backend load(String path, int threads) {
        return new PteBackend(Module.load(path));
    }

    @Override
    public float[] run(long[] inputIds, long[] attentionMask, int batch, int seqLen, long[] shapeOut) {
        long[] shape = new long[] {batch, seqLen};
        EValue[] out = module.forward(EValue.from(Tensor.fromBlob(inputIds, shape)),
                EValue.from(Tensor.fromBlob(attentionMask, shape)));
        Tensor t = out[0].toTensor();
        long[] s = t.shape();
        shapeOut[0] = s.length;
        System.arraycopy(s, 0, shapeOut, 1, s.length);
        return t.getDataAsFloatArray();
    }

    @Override
    public String runtimeVersion() {
        return "executorch (org.pytorch:executorch-android)";
    }

    @Override
    public void close() {
        module.destroy();
    }
}

package com.pocketformer.demo;

import java.util.List;

/**
 * Sentences -> embeddings: tokenize, pad each batch to its longest sentence (mask 0 on the
 * padding, as {@code transformers}' tokenizer with padding=True), run the backend. The
 * exported MiniLM graph already mean-pools and L2-normalises.
 */
public final class Embedder {
    public final WordPieceTokenizer tokenizer;
    public final Backend backend;
    public final int maxLen;

    public long lastRunNanos;

    public Embedder(WordPieceTokenizer tokenizer, Backend backend, int maxLen) {
        this.tokenizer = tokenizer;
        this.backend = backend;
        this.maxLen = maxLen;
    }

    public float[][] embed(List<String> sentences, int batchSize) {
        float[][] out = new float[sentences.size()][];
        for (int b0 = 0; b0 < sentences.size(); b0 += batchSize) {
            int b1 = Math.min(sentences.size(), b0 + batchSize);
            long[][] enc = new long[b1 - b0][];
            int seq = 1;
            for (int i = b0; i < b1; i++) {
                enc[i - b0] = tokenizer.encode(sentences.get(i), maxLen);
                seq = Math.max(seq, enc[i - b0].length);
            }
            int batch = b1 - b0;
            long[] ids = new long[batch * seq];
            long[] mask = new long[batch * seq];
            for (int r = 0; r < batch; r++) {
                for (int t = 0; t < seq; t++) {
                    boolean real = t < enc[r].length;
                    ids[r * seq + t] = real ? enc[r][t] : tokenizer.padId;
                    mask[r * seq + t] = real ? 1 : 0;
                }
            }
            long[] shape = new long[9];
            long t0 = System.nanoTime();
            float[] y = backend.run(ids, mask, batch, seq, shape);
            lastRunNanos = System.nanoTime() - t0;
            if (shape[0] != 2 || shape[1] != batch) {
                throw new IllegalStateException("expected a [batch, dim] output, got rank " + shape[0]);
            }
            int dim = (int) shape[2];
            for (int r = 0; r < batch; r++) {
                float[] row = new float[dim];
                System.arraycopy(y, r * dim, row, 0, dim);
                out[b0 + r] = row;
            }
        }
        return out;
    }

    public static double cosine(float[] a, float[] b) {
        double dot = 0, na = 0, nb = 0;
        for (int i = 0; i < a.length; i++) {
            dot += (double) a[i] * b[i];
            na += (double) a[i] * a[i];
            nb += (double) b[i] * b[i];
        }
        return dot / Math.max(1e-12, Math.sqrt(na) * Math.sqrt(nb));
    }
}

package com.pocketformer.demo;

import java.io.BufferedReader;
import java.io.File;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.nio.charset.Charset;
import java.util.LinkedHashMap;
import java.util.Locale;
import java.util.Map;

/**
 * The app's benchmark mode, platform independent (it runs on the phone from MainActivity and
 * on the host JVM from the tests). Writes the JSON schema of our native runners
 * (runtime_bench/native/bench_common.h): runner, runtime_version, arch, model, threads,
 * warmup, runs, load_ms, first_inference_ms, latencies_ms, peak_rss_mb, rss_before_load_mb,
 * inputs, outputs[{dtype, shape, numel, sum, abs_sum, values}], plus an "app" object.
 *
 * Inputs: {@code text} tokenized by the app's WordPiece tokenizer, padded (mask 0) to
 * {@code seqLen} tokens, batch 1 -- the layout of the exported artifact's .inputs.npz.
 * Timing: load (session creation) alone, the first inference alone, {@code warmup} untimed
 * runs, then {@code runs} timed runs. The result is written to a temporary file and renamed,
 * so a poller never reads half a file; a failure writes {"error", "exit_code"} instead
 * (2: bad input such as an unloadable artifact, 4: runtime failure).
 */
public final class BenchRunner {
    public static final String RUNNER = "pocketformer-android-app";
    public static final String DEFAULT_TEXT = "A man is playing a guitar on the stage.";

    public interface Loader {
        Backend load() throws Exception;
    }

    public static final class Options {
        public String model = "";
        public int warmup = 5;
        public int runs = 30;
        public int threads = 1;
        public int seqLen = 128;
        public int values = 8;
        public String text = DEFAULT_TEXT;
        public String runner = RUNNER;
        public Map<String, Object> app = new LinkedHashMap<String, Object>();
    }

    /** Runs the benchmark and returns the JSON text (never throws for model problems). */
    public static String run(Loader loader, WordPieceTokenizer tok, Options o) {
        Backend backend = null;
        try {
            if (o.runs < 1 || o.warmup < 0 || o.threads < 1 || o.seqLen < 2) {
                return error(o, "runs must be >= 1, warmup >= 0, threads >= 1, seq_len >= 2", 2);
            }
            long[] enc = tok.encode(o.text, o.seqLen);
            long[] ids = new long[o.seqLen];
            long[] mask = new long[o.seqLen];
            for (int t = 0; t < o.seqLen; t++) {
                ids[t] = t < enc.length ? enc[t] : tok.padId;
                mask[t] = t < enc.length ? 1 : 0;
            }
            double rssBefore = statusMb("VmRSS");
            long t0 = System.nanoTime();
            try {
                backend = loader.load();
            } catch (IllegalArgumentException e) {
                return error(o, "cannot load " + o.model + ": " + e.getMessage(), 2);
            }
            double loadMs = ms(System.nanoTime() - t0);
            long[] shape = new long[9];
            t0 = System.nanoTime();
            float[] y = backend.run(ids, mask, 1, o.seqLen, shape);
            double firstMs = ms(System.nanoTime() - t0);
            for (int i = 0; i < o.warmup; i++) backend.run(ids, mask, 1, o.seqLen, shape);
            double[] lat = new double[o.runs];
            for (int i = 0; i < o.runs; i++) {
                t0 = System.nanoTime();
                y = backend.run(ids, mask, 1, o.seqLen, shape);
                lat[i] = ms(System.nanoTime() - t0);
            }
            StringBuilder j = new StringBuilder(4096);
            j.append("{\n  \"runner\": ").append(str(o.runner));
            j.append(",\n  \"runtime_version\": ").append(str(backend.runtimeVersion()));
            j.append(",\n  \"arch\": ").append(str(arch()));
            j.append(",\n  \"model\": ").append(str(o.model));
            j.append(",\n  \"threads\": ").append(o.threads).append(",\n  \"threads_applied\": true");
            j.append(",\n  \"warmup\": ").append(o.warmup).append(",\n  \"runs\": ").append(o.runs);
            j.append(",\n  \"load_ms\": ").append(num(loadMs));
            j.append(",\n  \"first_inference_ms\": ").append(num(firstMs));
            j.append(",\n  \"latencies_ms\": [");
            for (int i = 0; i < lat.length; i++) j.append(i > 0 ? ", " : "").append(num(lat[i]));
            j.append("],\n  \"peak_rss_mb\": ").append(num(statusMb("VmHWM")));
            j.append(",\n  \"rss_before_load_mb\": ").append(num(rssBefore));
            String src = "text:" + o.text;
            j.append(",\n  \"inputs\": [{\"name\": \"input_ids\", \"dtype\": \"int64\", \"shape\": [1, ")
                    .append(o.seqLen).append("], \"source\": ").append(str(src)).append(", \"tokens\": ")
                    .append(enc.length).append("}, {\"name\": \"attention_mask\", \"dtype\": \"int64\", \"shape\": [1, ")
                    .append(o.seqLen).append("], \"source\": ").append(str(src)).append("}]");
            j.append(",\n  \"outputs\": [\n    ").append(output(y, shape, o.values)).append("\n  ]");
            j.append(",\n  \"app\": ").append(object(o.app));
            j.append("\n}\n");
            return j.toString();
        } catch (IllegalArgumentException e) {
            return error(o, String.valueOf(e.getMessage()), 2);
        } catch (Throwable e) {
            return error(o, e.getClass().getSimpleName() + ": " + e.getMessage(), 4);
        } finally {
            if (backend != null) backend.close();
        }
    }

    public static String error(Options o, String message, int exitCode) {
        return "{\n  \"runner\": " + str(o.runner) + ",\n  \"model\": " + str(o.model)
                + ",\n  \"error\": " + str(message) + ",\n  \"exit_code\": " + exitCode
                + ",\n  \"app\": " + object(o.app) + "\n}\n";
    }

    /** Writes beside {@code path} and renames, so a reader never sees half a file. */
    public static void writeAtomically(File path, String text) throws IOException {
        File dir = path.getAbsoluteFile().getParentFile();
        if (dir != null && !dir.isDirectory() && !dir.mkdirs()) {
            throw new IOException("cannot create " + dir);
        }
        File tmp = new File(dir, "." + path.getName() + ".tmp");
        OutputStream out = new FileOutputStream(tmp);
        try {
            out.write(text.getBytes(Charset.forName("UTF-8")));
            out.flush();
        } finally {
            out.close();
        }
        if (!tmp.renameTo(path)) {
            tmp.delete();
            throw new IOException("cannot rename " + tmp + " to " + path);
        }
    }

    // ------------------------------------------------------------------ helpers

    static String output(float[] y, long[] shape, int k) {
        double sum = 0, abs = 0;
        for (float v : y) {
            sum += v;
            abs += Math.abs(v);
        }
        StringBuilder j = new StringBuilder("{\"dtype\": \"float32\", \"shape\": [");
        for (int d = 0; d < shape[0]; d++) j.append(d > 0 ? ", " : "").append(shape[d + 1]);
        j.append("], \"numel\": ").append(y.length).append(", \"sum\": ").append(num(sum))
                .append(", \"abs_sum\": ").append(num(abs)).append(", \"values\": [");
        for (int i = 0; i < y.length && i < k; i++) j.append(i > 0 ? ", " : "").append(num(y[i]));
        return j.append("]}").toString();
    }

    static String arch() {
        String a = System.getProperty("os.arch", "unknown");
        if (a.equals("amd64")) return "x86_64";
        if (a.equals("arm64")) return "aarch64";
        return a;
    }

    /** A field of /proc/self/status in MB (kB / 1024), or NaN (written as null). */
    static double statusMb(String field) {
        try {
            BufferedReader r = new BufferedReader(new InputStreamReader(
                    new FileInputStream("/proc/self/status"), Charset.forName("UTF-8")));
            try {
                String line;
                while ((line = r.readLine()) != null) {
                    if (line.startsWith(field + ":")) {
                        String[] parts = line.substring(field.length() + 1).trim().split("\\s+");
                        return Long.parseLong(parts[0]) / 1024.0;
                    }
                }
            } finally {
                r.close();
            }
        } catch (IOException e) {
            // not Linux: unknown
        } catch (NumberFormatException e) {
            // unexpected format: unknown
        }
        return Double.NaN;
    }

    static double ms(long nanos) {
        return nanos / 1e6;
    }

    static String num(double v) {
        if (Double.isNaN(v) || Double.isInfinite(v)) return "null";
        return Double.toString(v);           // shortest round-trip form, valid JSON
    }

    static String object(Map<String, Object> m) {
        StringBuilder j = new StringBuilder("{");
        boolean first = true;
        for (Map.Entry<String, Object> e : m.entrySet()) {
            j.append(first ? "" : ", ").append(str(e.getKey())).append(": ");
            Object v = e.getValue();
            if (v == null) j.append("null");
            else if (v instanceof Number) j.append(num(((Number) v).doubleValue()));
            else if (v instanceof Boolean) j.append(v.toString());
            else j.append(str(v.toString()));
            first = false;
        }
        return j.append("}").toString();
    }

    static String str(String s) {
        if (s == null) return "null";
        StringBuilder j = new StringBuilder(s.length() + 2).append('"');
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '"': j.append("\\\""); break;
                case '\\': j.append("\\\\"); break;
                case '\n': j.append("\\n"); break;
                case '\r': j.append("\\r"); break;
                case '\t': j.append("\\t"); break;
                default:
                    if (c < 0x20) j.append(String.format(Locale.ROOT, "\\u%04x", (int) c));
                    else j.append(c);
            }
        }
        return j.append('"').toString();
    }
}

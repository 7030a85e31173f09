package com.pocketformer.demo;

import java.io.BufferedReader;
import java.io.DataOutputStream;
import java.io.File;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.BufferedOutputStream;
import java.io.InputStreamReader;
import java.io.OutputStreamWriter;
import java.io.Writer;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.MappedByteBuffer;
import java.nio.channels.FileChannel;
import java.nio.charset.Charset;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/**
 * Host-JVM driver for the app's platform-independent classes (tokenizer, JNI session,
 * embedder, benchmark mode), used by tests/test_android_demo.py through
 * pocketformer.android.run_host_jvm. Not packaged in the APK.
 *
 * <pre>
 * HostCheck embed --model M --vocab V --sentences FILE --ids OUT --emb OUT
 *                 [--batch 16] [--threads 1] [--max-len 256] [--cased] [--buffer]
 * HostCheck bench --model M --vocab V --json OUT [--warmup 5] [--runs 30] [--threads 1]
 *                 [--seq-len 128] [--text T]
 * HostCheck names --model M
 * </pre>
 * Exit codes: 0 ok, 2 bad input (IllegalArgumentException), 4 other failures.
 */
public final class HostCheck {
    public static void main(String[] argv) throws Exception {
        try {
            System.exit(run(argv));
        } catch (IllegalArgumentException e) {
            System.err.println("error: " + e.getMessage());
            System.exit(2);
        } catch (Throwable e) {
            System.err.println("error: " + e);
            System.exit(4);
        }
    }

    static int run(String[] argv) throws Exception {
        if (argv.length < 1) throw new IllegalArgumentException("usage: HostCheck embed|bench|names ...");
        String cmd = argv[0];
        Map<String, String> a = new HashMap<String, String>();
        for (int i = 1; i < argv.length; i++) {
            String k = argv[i];
            if (!k.startsWith("--")) throw new IllegalArgumentException("unexpected argument " + k);
            if (k.equals("--cased") || k.equals("--buffer")) {
                a.put(k, "1");
            } else {
                if (i + 1 >= argv.length) throw new IllegalArgumentException(k + " needs a value");
                a.put(k, argv[++i]);
            }
        }
        int threads = Integer.parseInt(get(a, "--threads", "1"));
        if (cmd.equals("names")) {
            OrtSession s = OrtSession.fromPath(need(a, "--model"), threads);
            System.out.println("version " + OrtSession.version());
            for (String n : s.inputNames()) System.out.println("input " + n);
            for (String n : s.outputNames()) System.out.println("output " + n);
            s.close();
            return 0;
        }
        boolean lower = !a.containsKey("--cased");
        WordPieceTokenizer tok = WordPieceTokenizer.fromVocab(new FileInputStream(need(a, "--vocab")), lower);
        final String model = need(a, "--model");
        if (cmd.equals("embed")) {
            List<String> sentences = readLines(need(a, "--sentences"));
            int maxLen = Integer.parseInt(get(a, "--max-len", "256"));
            Backend backend = a.containsKey("--buffer") ? fromBuffer(model, threads)
                    : OrtSession.fromPath(model, threads);
            try {
                Writer ids = new OutputStreamWriter(new FileOutputStream(need(a, "--ids")), "UTF-8");
                for (String s : sentences) {
                    long[] enc = tok.encode(s, maxLen);
                    StringBuilder sb = new StringBuilder();
                    for (int i = 0; i < enc.length; i++) sb.append(i > 0 ? " " : "").append(enc[i]);
                    ids.write(sb.append('\n').toString());
                }
                ids.close();
                Embedder emb = new Embedder(tok, backend, maxLen);
                float[][] e = emb.embed(sentences, Integer.parseInt(get(a, "--batch", "16")));
                ByteBuffer buf = ByteBuffer.allocate(4 * e.length * (e.length > 0 ? e[0].length : 0))
                        .order(ByteOrder.LITTLE_ENDIAN);
                for (float[] row : e) for (float v : row) buf.putFloat(v);
                DataOutputStream out = new DataOutputStream(new BufferedOutputStream(
                        new FileOutputStream(need(a, "--emb"))));
                out.write(buf.array());
                out.close();
            } finally {
                backend.close();
            }
            return 0;
        }
        if (cmd.equals("bench")) {
            BenchRunner.Options o = new BenchRunner.Options();
            o.model = model;
            o.warmup = Integer.parseInt(get(a, "--warmup", "5"));
            o.runs = Integer.parseInt(get(a, "--runs", "30"));
            o.threads = threads;
            o.seqLen = Integer.parseInt(get(a, "--seq-len", "128"));
            if (a.containsKey("--text")) o.text = a.get("--text");
            o.runner = BenchRunner.RUNNER + " (host JVM)";
            o.app.put("jvm", System.getProperty("java.version"));
            final int th = threads;
            String json = BenchRunner.run(new BenchRunner.Loader() {
                @Override
                public Backend load() {
                    return OrtSession.fromPath(model, th);
                }
            }, tok, o);
            BenchRunner.writeAtomically(new File(need(a, "--json")), json);
            return json.contains("\"error\"") ? 2 : 0;
        }
        throw new IllegalArgumentException("unknown command " + cmd);
    }

    static Backend fromBuffer(String path, int threads) throws Exception {
        FileInputStream in = new FileInputStream(path);
        try {
            FileChannel ch = in.getChannel();
            MappedByteBuffer m = ch.map(FileChannel.MapMode.READ_ONLY, 0, ch.size());
            return OrtSession.fromBuffer(m, threads);
        } finally {
            in.close();
        }
    }

    static List<String> readLines(String path) throws Exception {
        BufferedReader r = new BufferedReader(new InputStreamReader(new FileInputStream(path), Charset.forName("UTF-8")));
        List<String> out = new ArrayList<String>();
        String line;
        while ((line = r.readLine()) != null) out.add(line);
        r.close();
        return out;
    }

    static String need(Map<String, String> a, String k) {
        String v = a.get(k);
        if (v == null) throw new IllegalArgumentException(k + " is required");
        return v;
    }

    static String get(Map<String, String> a, String k, String d) {
        String v = a.get(k);
        return v == null ? d : v;
    }
}

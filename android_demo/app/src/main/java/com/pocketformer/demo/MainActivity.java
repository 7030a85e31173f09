package com.pocketformer.demo;

import android.app.Activity;
import android.content.Intent;
import android.content.res.AssetFileDescriptor;
import android.os.Build;
import android.os.Bundle;
import android.text.InputType;
import android.view.View;
import android.view.ViewGroup;
import android.widget.Button;
import android.widget.EditText;
import android.widget.LinearLayout;
import android.widget.ScrollView;
import android.widget.TextView;

import java.io.File;
import java.io.FileInputStream;
import java.io.FileNotFoundException;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.nio.MappedByteBuffer;
import java.nio.channels.FileChannel;
import java.util.Arrays;
import java.util.Locale;

/**
 * One activity, two modes.
 *
 * <p>Interactive: type two sentences, see their cosine similarity and the inference latency
 * (the model and vocab come from the APK's assets; see {@link AppConfig}).
 *
 * <p>Benchmark, when started with an {@code artifact} extra (pocketformer/android.py builds the
 * command):
 * <pre>
 * am start -S -W -n com.pocketformer.demo/.MainActivity -a com.pocketformer.demo.BENCH \
 *   --es artifact model.onnx|/sdcard/Android/data/com.pocketformer.demo/files/.../model.onnx \
 *   --ei warmup 5 --ei runs 30 --ei threads 4 [--ei seq_len 128] [--es text "..."] \
 *   --es result /sdcard/Android/data/com.pocketformer.demo/files/bench/result-ID.json
 * </pre>
 * writes the native runners' JSON schema ({@link BenchRunner}) to {@code result} and finishes.
 * An artifact without a leading '/' is an asset of this APK.
 */
public class MainActivity extends Activity {
    public static final String ACTION_BENCH = "com.pocketformer.demo.BENCH";

    private AppConfig config;
    private WordPieceTokenizer tokenizer;
    private volatile Embedder embedder;
    private TextView status;
    private TextView result;
    private EditText first;
    private EditText second;

    @Override
    protected void onCreate(Bundle savedInstanceState) {
        super.onCreate(savedInstanceState);
        Intent intent = getIntent();
        if (intent != null && intent.hasExtra("artifact")) {
            startBenchmark(intent);
        } else {
            startInteractive();
        }
    }

    // ------------------------------------------------------------------ interactive

    private void startInteractive() {
        int pad = (int) (16 * getResources().getDisplayMetrics().density);
        LinearLayout col = new LinearLayout(this);
        col.setOrientation(LinearLayout.VERTICAL);
        col.setPadding(pad, pad, pad, pad);
        status = new TextView(this);
        status.setText("Loading the model...");
        first = sentenceBox("A man is playing a guitar.");
        second = sentenceBox("Someone plays an instrument on stage.");
        Button go = new Button(this);
        go.setText("Compare");
        result = new TextView(this);
        result.setTextSize(18);
        col.addView(status);
        col.addView(first);
        col.addView(second);
        col.addView(go);
        col.addView(result);
        ScrollView scroll = new ScrollView(this);
        scroll.addView(col);
        setContentView(scroll);

        go.setOnClickListener(new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                compare();
            }
        });
        new Thread(new Runnable() {
            @Override
            public void run() {
                final String msg;
                try {
                    long t0 = System.nanoTime();
                    loadConfigAndTokenizer();
                    Backend backend = openArtifact(config.model, 4);
                    embedder = new Embedder(tokenizer, backend, config.maxSeqLength);
                    msg = String.format(Locale.ROOT, "%s loaded in %.0f ms (%s, %s)", config.model,
                            (System.nanoTime() - t0) / 1e6, backend.runtimeVersion(), Build.SUPPORTED_ABIS[0]);
                } catch (Throwable e) {
                    showStatus("Cannot load the model: " + e);
                    return;
                }
                showStatus(msg);
            }
        }, "pf-load").start();
    }

    private EditText sentenceBox(String text) {
        EditText e = new EditText(this);
        e.setInputType(InputType.TYPE_CLASS_TEXT | InputType.TYPE_TEXT_FLAG_MULTI_LINE);
        e.setText(text);
        e.setLayoutParams(new LinearLayout.LayoutParams(ViewGroup.LayoutParams.MATCH_PARENT,
                ViewGroup.LayoutParams.WRAP_CONTENT));
        return e;
    }

    private void compare() {
        final Embedder emb = embedder;
        if (emb == null) {
            result.setText("The model is still loading.");
            return;
        }
        final String a = first.getText().toString();
        final String b = second.getText().toString();
        new Thread(new Runnable() {
            @Override
            public void run() {
                try {
                    long t0 = System.nanoTime();
                    float[][] e = emb.embed(Arrays.asList(a, b), 2);
                    double totalMs = (System.nanoTime() - t0) / 1e6;
                    final String text = String.format(Locale.ROOT,
                            "cosine similarity %.4f\ninference %.1f ms (tokenize + run %.1f ms)",
                            Embedder.cosine(e[0], e[1]), emb.lastRunNanos / 1e6, totalMs);
                    runOnUiThread(new Runnable() {
                        @Override
                        public void run() {
                            result.setText(text);
                        }
                    });
                } catch (final Throwable t) {
                    showStatus("Inference failed: " + t);
                }
            }
        }, "pf-infer").start();
    }

    private void showStatus(final String msg) {
        runOnUiThread(new Runnable() {
            @Override
            public void run() {
                status.setText(msg);
            }
        });
    }

    // ------------------------------------------------------------------ benchmark

    private void startBenchmark(Intent intent) {
        final BenchRunner.Options o = new BenchRunner.Options();
        final String artifact = intent.getStringExtra("artifact");
        o.model = artifact;
        o.warmup = intent.getIntExtra("warmup", o.warmup);
        o.runs = intent.getIntExtra("runs", o.runs);
        o.threads = intent.getIntExtra("threads", o.threads);
        o.seqLen = intent.getIntExtra("seq_len", o.seqLen);
        if (intent.hasExtra("text")) o.text = intent.getStringExtra("text");
        String resultExtra = intent.getStringExtra("result");
        final File resultFile = resultExtra != null ? new File(resultExtra)
                : new File(getExternalFilesDir(null), "bench/result.json");
        o.app.put("package", getPackageName());
        o.app.put("abi", Build.SUPPORTED_ABIS[0]);
        o.app.put("manufacturer", Build.MANUFACTURER);
        o.app.put("model", Build.MODEL);
        o.app.put("android_sdk", Build.VERSION.SDK_INT);
        o.app.put("android_release", Build.VERSION.RELEASE);
        o.app.put("artifact_source", artifact != null && artifact.startsWith("/") ? "file" : "asset");

        TextView t = new TextView(this);
        t.setText("pocketformer benchmark: " + artifact + " -> " + resultFile);
        setContentView(t);

        new Thread(new Runnable() {
            @Override
            public void run() {
                String json;
                try {
                    loadConfigAndTokenizer();
                    json = BenchRunner.run(new BenchRunner.Loader() {
                        @Override
                        public Backend load() throws Exception {
                            return openArtifact(artifact, o.threads);
                        }
                    }, tokenizer, o);
                } catch (Throwable e) {
                    json = BenchRunner.error(o, "app setup failed: " + e, 4);
                }
                try {
                    BenchRunner.writeAtomically(resultFile, json);
                } catch (IOException e) {
                    android.util.Log.e("pocketformer", "cannot write " + resultFile, e);
                }
                finish();
            }
        }, "pf-bench").start();
    }

    // ------------------------------------------------------------------ loading

    private synchronized void loadConfigAndTokenizer() throws IOException {
        if (tokenizer != null) return;
        InputStream cfg;
        try {
            cfg = getAssets().open(AppConfig.ASSET);
        } catch (FileNotFoundException e) {
            cfg = null;
        }
        config = AppConfig.load(cfg);
        InputStream vocab = getAssets().open(config.vocab);
        try {
            tokenizer = WordPieceTokenizer.fromVocab(vocab, config.lowerCase);
        } finally {
            vocab.close();
        }
    }

    /** An absolute path is a file on the device; anything else is an asset of this APK. */
    Backend openArtifact(String artifact, int threads) throws Exception {
        if (artifact == null || artifact.length() == 0) {
            throw new IllegalArgumentException("no artifact given");
        }
        if (artifact.endsWith(".pte")) {
            // ExecuTorch: only in APKs built by the Gradle project with the executorch-android
            // AAR (see android_demo/README.md); pocketformer android-demo builds ONNX Runtime only.
            try {
                Class<?> c = Class.forName("com.pocketformer.demo.PteBackend");
                String path = artifact.startsWith("/") ? artifact : copyAsset(artifact).getPath();
                return (Backend) c.getMethod("load", String.class, int.class).invoke(null, path, threads);
            } catch (ClassNotFoundException e) {
                throw new IllegalArgumentException("this APK has no ExecuTorch runtime: .pte artifacts "
                        + "need the Gradle build with org.pytorch:executorch-android");
            }
        }
        if (artifact.startsWith("/")) {
            if (!new File(artifact).canRead()) {
                throw new IllegalArgumentException("cannot read " + artifact);
            }
            return OrtSession.fromPath(artifact, threads);
        }
        try {
            // Stored (uncompressed) asset: map it straight out of the APK, no copy.
            AssetFileDescriptor afd = getAssets().openFd(artifact);
            FileInputStream in = afd.createInputStream();
            try {
                FileChannel ch = in.getChannel();
                MappedByteBuffer buf = ch.map(FileChannel.MapMode.READ_ONLY, afd.getStartOffset(),
                        afd.getDeclaredLength());
                return OrtSession.fromBuffer(buf, threads);
            } finally {
                in.close();
            }
        } catch (FileNotFoundException e) {
            // Compressed asset (or none): copy it out, then load by path.
            return OrtSession.fromPath(copyAsset(artifact).getPath(), threads);
        }
    }

    private File copyAsset(String name) throws IOException {
        File out = new File(getCacheDir(), name);
        InputStream in;
        try {
            in = getAssets().open(name);
        } catch (FileNotFoundException e) {
            throw new IllegalArgumentException("no asset named " + name + " in this APK");
        }
        File tmp = new File(getCacheDir(), name + ".tmp");
        OutputStream os = new FileOutputStream(tmp);
        try {
            byte[] buf = new byte[1 << 16];
            int n;
            while ((n = in.read(buf)) > 0) os.write(buf, 0, n);
        } finally {
            os.close();
            in.close();
        }
        if (!tmp.renameTo(out)) throw new IOException("cannot rename " + tmp);
        return out;
    }
}

package com.pocketformer.demo;

import java.io.IOException;
import java.io.InputStream;
import java.util.Properties;

/**
 * {@code pocketformer_app.properties}, written next to the model in the assets by the APK
 * builder (pocketformer/android.py) or the Gradle task: which model and vocab file to load and
 * how to tokenize. Missing file or keys fall back to the MiniLM defaults.
 */
public final class AppConfig {
    public static final String ASSET = "pocketformer_app.properties";

    public String model = "model.onnx";
    public String vocab = "vocab.txt";
    public boolean lowerCase = true;
    public int maxSeqLength = 256;
    public String source = "minilm";

    public static AppConfig load(InputStream in) throws IOException {
        AppConfig c = new AppConfig();
        if (in == null) return c;
        Properties p = new Properties();
        try {
            p.load(in);
        } finally {
            in.close();
        }
        c.model = p.getProperty("model", c.model);
        c.vocab = p.getProperty("vocab", c.vocab);
        c.lowerCase = Boolean.parseBoolean(p.getProperty("do_lower_case", String.valueOf(c.lowerCase)));
        c.maxSeqLength = Integer.parseInt(p.getProperty("max_seq_length", String.valueOf(c.maxSeqLength)).trim());
        c.source = p.getProperty("source", c.source);
        return c;
    }
}

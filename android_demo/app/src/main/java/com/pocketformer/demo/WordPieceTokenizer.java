package com.pocketformer.demo;

import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.nio.charset.Charset;
import java.text.Normalizer;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;

/**
 * BERT WordPiece tokenizer reading a model's {@code vocab.txt}: the same steps, in the same
 * order, as Hugging Face {@code tokenizers}' BertNormalizer + BertPreTokenizer + WordPiece +
 * the [CLS] A [SEP] template (what {@code transformers}' BertTokenizer(Fast) does for
 * all-MiniLM-L6-v2):
 *
 * <ol>
 *   <li>clean text: drop U+0000, U+FFFD and "other" characters (Unicode category C*) except
 *       tab/CR/LF; map every White_Space character to a space;</li>
 *   <li>surround CJK ideographs with spaces;</li>
 *   <li>if lower-casing: strip accents (NFD, drop non-spacing marks Mn), then lower-case each
 *       code point (full mapping: U+0130 becomes "i" + U+0307, no final-sigma rule);</li>
 *   <li>split on whitespace and isolate every punctuation character (ASCII punctuation or
 *       Unicode category P*);</li>
 *   <li>WordPiece: greedy longest match first, continuation pieces prefixed "##", a word longer
 *       than 100 code points or with an unmatched piece becomes [UNK].</li>
 * </ol>
 *
 * Java 8 language level only (the APK is dexed with dx): no lambdas.
 */
public final class WordPieceTokenizer {
    public static final int MAX_INPUT_CHARS_PER_WORD = 100;

    private final HashMap<String, Integer> vocab;
    private final boolean lowerCase;
    public final int unkId;
    public final int clsId;
    public final int sepId;
    public final int padId;

    public WordPieceTokenizer(List<String> tokens, boolean lowerCase) {
        this.vocab = new HashMap<String, Integer>(tokens.size() * 2);
        for (int i = 0; i < tokens.size(); i++) {
            if (!vocab.containsKey(tokens.get(i))) vocab.put(tokens.get(i), i);
        }
        this.lowerCase = lowerCase;
        this.unkId = require("[UNK]");
        this.clsId = require("[CLS]");
        this.sepId = require("[SEP]");
        this.padId = require("[PAD]");
    }

    /** One token per line (vocab.txt), UTF-8; the line number is the id. */
    public static WordPieceTokenizer fromVocab(InputStream in, boolean lowerCase) throws IOException {
        BufferedReader r = new BufferedReader(new InputStreamReader(in, Charset.forName("UTF-8")));
        List<String> tokens = new ArrayList<String>();
        String line;
        while ((line = r.readLine()) != null) {
            // BertTokenizer's load_vocab strips the trailing newline only ("\n"), keep the rest.
            if (line.endsWith("\r")) line = line.substring(0, line.length() - 1);
            tokens.add(line);
        }
        if (tokens.isEmpty()) throw new IOException("vocab is empty");
        return new WordPieceTokenizer(tokens, lowerCase);
    }

    public int vocabSize() {
        return vocab.size();
    }

    private int require(String token) {
        Integer id = vocab.get(token);
        if (id == null) throw new IllegalArgumentException("vocab has no " + token + " token");
        return id;
    }

    /** [CLS] pieces [SEP], truncated to {@code maxLen} ids in all (>= 2). */
    public long[] encode(String text, int maxLen) {
        List<Integer> ids = tokenizeToIds(text);
        int n = Math.min(ids.size(), Math.max(0, maxLen - 2));
        long[] out = new long[n + 2];
        out[0] = clsId;
        for (int i = 0; i < n; i++) out[i + 1] = ids.get(i);
        out[n + 1] = sepId;
        return out;
    }

    public List<Integer> tokenizeToIds(String text) {
        List<Integer> ids = new ArrayList<Integer>();
        for (String word : preTokenize(normalize(text))) wordPiece(word, ids);
        return ids;
    }

    public List<String> tokenize(String text) {
        List<String> out = new ArrayList<String>();
        HashMap<Integer, String> inverse = null;
        for (Integer id : tokenizeToIds(text)) {
            if (inverse == null) {
                inverse = new HashMap<Integer, String>();
                for (java.util.Map.Entry<String, Integer> e : vocab.entrySet()) inverse.put(e.getValue(), e.getKey());
            }
            out.add(inverse.get(id));
        }
        return out;
    }

    // ------------------------------------------------------------------ normalizer

    String normalize(String text) {
        StringBuilder sb = new StringBuilder(text.length() + 16);
        for (int i = 0; i < text.length(); ) {
            int cp = text.codePointAt(i);
            i += Character.charCount(cp);
            if (cp == 0 || cp == 0xFFFD || isControl(cp)) continue;
            if (isWhitespace(cp)) {
                sb.append(' ');
            } else if (isChinese(cp)) {
                sb.append(' ').appendCodePoint(cp).append(' ');
            } else {
                sb.appendCodePoint(cp);
            }
        }
        String s = sb.toString();
        if (!lowerCase) return s;
        String nfd = Normalizer.normalize(s, Normalizer.Form.NFD);
        StringBuilder out = new StringBuilder(nfd.length());
        for (int i = 0; i < nfd.length(); ) {
            int cp = nfd.codePointAt(i);
            i += Character.charCount(cp);
            if (Character.getType(cp) == Character.NON_SPACING_MARK) continue;
            if (cp == 0x130) {
                out.append("i\u0307");       // the one unconditional multi-char lower-case mapping
            } else {
                out.appendCodePoint(Character.toLowerCase(cp));
            }
        }
        return out.toString();
    }

    /** Unicode White_Space (Rust's char::is_whitespace), not Java's isWhitespace. */
    static boolean isWhitespace(int cp) {
        return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680
                || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F
                || cp == 0x205F || cp == 0x3000;
    }

    static boolean isControl(int cp) {
        if (cp == '\t' || cp == '\n' || cp == '\r') return false;
        int t = Character.getType(cp);
        return t == Character.CONTROL || t == Character.FORMAT || t == Character.SURROGATE
                || t == Character.PRIVATE_USE || t == Character.UNASSIGNED;
    }

    static boolean isChinese(int cp) {
        return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF)
                || (cp >= 0x20000 && cp <= 0x2A6DF) || (cp >= 0x2A700 && cp <= 0x2B73F)
                || (cp >= 0x2B740 && cp <= 0x2B81F) || (cp >= 0x2B920 && cp <= 0x2CEAF)
                || (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
    }

    static boolean isPunctuation(int cp) {
        if ((cp >= 33 && cp <= 47) || (cp >= 58 && cp <= 64) || (cp >= 91 && cp <= 96)
                || (cp >= 123 && cp <= 126)) return true;
        switch (Character.getType(cp)) {
            case Character.CONNECTOR_PUNCTUATION:
            case Character.DASH_PUNCTUATION:
            case Character.START_PUNCTUATION:
            case Character.END_PUNCTUATION:
            case Character.INITIAL_QUOTE_PUNCTUATION:
            case Character.FINAL_QUOTE_PUNCTUATION:
            case Character.OTHER_PUNCTUATION:
                return true;
            default:
                return false;
        }
    }

    // ------------------------------------------------------------------ pre-tokenizer

    static List<String> preTokenize(String s) {
        List<String> words = new ArrayList<String>();
        StringBuilder cur = new StringBuilder();
        for (int i = 0; i < s.length(); ) {
            int cp = s.codePointAt(i);
            i += Character.charCount(cp);
            if (isWhitespace(cp)) {
                flush(cur, words);
            } else if (isPunctuation(cp)) {
                flush(cur, words);
                words.add(new String(Character.toChars(cp)));
            } else {
                cur.appendCodePoint(cp);
            }
        }
        flush(cur, words);
        return words;
    }

    private static void flush(StringBuilder cur, List<String> words) {
        if (cur.length() > 0) {
            words.add(cur.toString());
            cur.setLength(0);
        }
    }

    // ------------------------------------------------------------------ WordPiece

    private void wordPiece(String word, List<Integer> out) {
        int nChars = word.codePointCount(0, word.length());
        if (nChars > MAX_INPUT_CHARS_PER_WORD) {
            out.add(unkId);
            return;
        }
        List<Integer> pieces = new ArrayList<Integer>();
        int start = 0;
        while (start < word.length()) {
            int end = word.length();
            Integer found = null;
            while (start < end) {
                String sub = word.substring(start, end);
                if (start > 0) sub = "##" + sub;
                Integer id = vocab.get(sub);
                if (id != null) {
                    found = id;
                    break;
                }
                end = word.offsetByCodePoints(end, -1);
            }
            if (found == null) {
                out.add(unkId);
                return;
            }
            pieces.add(found);
            start = end;
        }
        out.addAll(pieces);
    }
}

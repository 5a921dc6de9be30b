//! The built-in training corpus for [`crate::train`]: hand-written English plus a deterministic
//! synthetic text generator, so that a tokenizer can be trained with nothing read from disk or
//! downloaded.
//!
//! The synthetic part is made from a lexicon of invented words (built from syllable
//! inventories, mostly Latin-script with a little Greek, Cyrillic and CJK), used with a
//! Zipf-like frequency so that common pieces get merged first, mixed with a uniform draw so
//! that every lexicon word occurs often enough to be merged at all. It is laid out as prose,
//! code, data and markup, with numbers, punctuation, indentation and newlines. BPE with
//! `min_frequency` 2 merges every word that occurs at least twice into a single token in the
//! end, so the lexicon size bounds the reachable vocabulary; it is scaled to the target.

use std::collections::HashSet;

const ENGLISH: &str = include_str!("corpus_english.txt");

/// Chat-shaped lines, so role names and chat words get merges of their own.
const CHAT: &str = "system\nYou are a helpful assistant.\nuser\nWrite a haiku about linear attention.\n\
assistant\nSure! Here is a short poem about recurrent state and memory.\nuser\n\
What is the capital of France? Please answer in one word.\nassistant\nParis.\n\
tool\n{\"temperature\": 21, \"unit\": \"celsius\"}\n";

/// Copies of the hand-written text: BPE needs a pair twice to merge it, and repetition
/// gives its common words priority over invented ones.
const ENGLISH_COPIES: usize = 8;

/// Target size of one document; documents are fed to the trainer in parallel.
const DOCUMENT_BYTES: usize = 64 * 1024;

/// xorshift64*: small, fast and good enough for text generation.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    /// True with probability `percent / 100`.
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick(&mut self, items: &[&'static str]) -> &'static str {
        items[self.below(items.len())]
    }

    /// Uniform in `0.0..1.0`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const ONSETS: &[&str] = &[
    "", "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
    "y", "z", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "pl", "pr", "qu", "sc", "sh",
    "sk", "sl", "sm", "sn", "sp", "st", "str", "sw", "th", "tr", "wh",
];
const NUCLEI: &[&str] = &[
    "a", "e", "i", "o", "u", "a", "e", "i", "o", "ea", "ee", "ai", "ou", "oo", "io", "ie", "y",
    "au", "oa",
];
const CODAS: &[&str] = &[
    "", "", "", "", "n", "r", "s", "t", "l", "m", "d", "ng", "nd", "st", "ck", "rt", "ll", "ss",
    "nt", "x", "sh", "th", "ct", "mp", "rk",
];
const SUFFIXES: &[&str] = &[
    "", "", "", "", "", "s", "ed", "ing", "er", "ly", "tion", "ment", "ness", "able", "ity", "ous",
    "ive", "al",
];
const GREEK: &[&str] = &[
    "α", "β", "γ", "δ", "ε", "ζ", "η", "θ", "ι", "κ", "λ", "μ", "ν", "ξ", "ο", "π", "ρ", "σ", "τ",
    "υ", "φ", "χ", "ω", "ά", "έ", "ή", "ί", "ό", "ύ", "ώ",
];
const CYRILLIC_ONSETS: &[&str] = &[
    "б", "в", "г", "д", "ж", "з", "к", "л", "м", "н", "п", "р", "с", "т", "ф", "х", "ц", "ч", "ш",
];
const CYRILLIC_VOWELS: &[&str] = &["а", "е", "и", "о", "у", "ы", "я", "ю", "ё"];
const CJK: &[&str] = &[
    "的", "一", "是", "不", "了", "人", "我", "在", "有", "他", "这", "中", "大", "来", "上", "国",
    "个", "到", "说", "们", "为", "子", "和", "你", "地", "出", "道", "也", "时", "年", "得", "就",
    "那", "要", "下", "以", "生", "会", "自", "着", "去", "之", "过", "家", "学", "对", "可", "她",
    "里", "后", "小", "么", "心", "多", "天", "而", "能", "好", "都", "然", "没", "日", "于", "起",
    "还", "发", "成", "事", "只", "作", "当", "想", "看", "文", "无", "开", "手", "十", "用", "主",
    "行", "方", "又", "如", "前", "所", "本", "见", "经", "头", "面", "公", "同", "三", "の", "に",
    "は", "を", "た", "が", "で", "て", "と", "し", "れ", "さ", "あ", "い", "う", "え", "お", "か",
    "き", "く", "ア", "イ", "ウ", "カ", "キ", "ク", "テ", "ス", "ト", "語", "本", "한", "국", "어",
    "입", "니", "다",
];
const KEYWORDS: &[&str] = &[
    "def", "return", "if", "else", "elif", "for", "in", "while", "import", "from", "class", "self",
    "None", "True", "False", "fn", "let", "mut", "pub", "struct", "impl", "match", "use", "const",
    "static", "void", "int", "char", "float", "bool", "string", "public", "private", "new", "null",
    "this", "function", "var", "async", "await", "try", "except", "catch", "raise", "throw",
    "with", "as", "and", "or", "not", "is", "lambda", "yield", "break", "continue", "type", "enum",
    "trait", "where", "loop", "Some", "Ok", "Err", "Result", "Option", "Vec", "String", "len",
    "print", "range", "list", "dict", "str", "assert", "pass",
];
const OPERATORS: &[&str] = &[
    " = ", " + ", " - ", " * ", " / ", " == ", " != ", " < ", " > ", " <= ", " >= ", " += ",
    " -= ", " && ", " || ", " % ", " -> ", " => ", ".", "::", ", ",
];
const ACRONYMS: &[&str] = &[
    "API", "HTTP", "JSON", "URL", "CPU", "GPU", "USA", "UK", "EU", "NASA", "HTML", "CSS", "SQL",
    "PDF", "ID", "OK", "TV", "AI", "BPE", "UTF",
];

/// The invented words, most frequent first.
struct Lexicon {
    words: Vec<String>,
    /// Cumulative Zipf weights, for sampling by rank.
    cumulative: Vec<f64>,
}

impl Lexicon {
    fn generate(rng: &mut Rng, size: usize) -> Self {
        let mut seen = HashSet::with_capacity(size);
        let mut words = Vec::with_capacity(size);
        while words.len() < size {
            let word = invent_word(rng);
            if seen.insert(word.clone()) {
                words.push(word);
            }
        }
        // Short words are the common ones, as in natural languages; the few non-Latin words
        // go to the rare end, so the prose reads as mostly one language.
        words.sort_by_key(|w| (!w.is_ascii(), w.chars().count()));
        let mut total = 0.0;
        let cumulative = (0..words.len())
            .map(|rank| {
                total += 1.0 / (rank as f64 + 2.7);
                total
            })
            .collect();
        Lexicon { words, cumulative }
    }

    /// Zipf-distributed most of the time, uniform otherwise so the tail occurs too.
    fn word<'a>(&'a self, rng: &mut Rng) -> &'a str {
        if rng.chance(35) {
            return &self.words[rng.below(self.words.len())];
        }
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let target = rng.unit() * total;
        let rank = self.cumulative.partition_point(|&c| c < target);
        &self.words[rank.min(self.words.len() - 1)]
    }
}

fn invent_word(rng: &mut Rng) -> String {
    let script = rng.below(100);
    let mut word = String::new();
    if script < 93 {
        let syllables = 1 + rng.below(3) + usize::from(rng.chance(30));
        for _ in 0..syllables {
            word.push_str(rng.pick(ONSETS));
            word.push_str(rng.pick(NUCLEI));
            word.push_str(rng.pick(CODAS));
        }
        word.push_str(rng.pick(SUFFIXES));
    } else if script < 95 {
        for _ in 0..2 + rng.below(5) {
            word.push_str(rng.pick(GREEK));
        }
    } else if script < 97 {
        for _ in 0..1 + rng.below(3) {
            word.push_str(rng.pick(CYRILLIC_ONSETS));
            word.push_str(rng.pick(CYRILLIC_VOWELS));
        }
    } else {
        for _ in 0..1 + rng.below(4) {
            word.push_str(rng.pick(CJK));
        }
    }
    word
}

fn capitalize(word: &str, out: &mut String) {
    let mut chars = word.chars();
    if let Some(first) = chars.next() {
        out.extend(first.to_uppercase());
        out.push_str(chars.as_str());
    }
}

fn push_number(rng: &mut Rng, out: &mut String) {
    match rng.below(6) {
        0 => out.push_str(&rng.below(10).to_string()),
        1 => out.push_str(&rng.below(100).to_string()),
        2 => out.push_str(&(1900 + rng.below(130)).to_string()),
        3 => out.push_str(&format!("{}.{}", rng.below(1000), rng.below(100))),
        4 => out.push_str(&rng.below(100_000).to_string()),
        _ => out.push_str(&format!("{}%", rng.below(101))),
    }
}

struct Generator<'a> {
    rng: Rng,
    lexicon: &'a Lexicon,
}

impl Generator<'_> {
    /// A lexicon word usable in an identifier (a few draws, then a fixed one).
    fn ascii_word(&mut self) -> &str {
        for _ in 0..8 {
            let w = self.lexicon.word(&mut self.rng);
            if w.is_ascii() {
                return w;
            }
        }
        "value"
    }

    fn sentence(&mut self, out: &mut String) {
        let words = 4 + self.rng.below(16);
        for i in 0..words {
            if i > 0 {
                out.push(' ');
            }
            let r = self.rng.below(100);
            if r < 3 {
                push_number(&mut self.rng, out);
            } else if r < 5 {
                out.push_str(self.rng.pick(ACRONYMS));
            } else if r < 7 {
                out.push('(');
                let w = self.lexicon.word(&mut self.rng);
                out.push_str(w);
                out.push(')');
            } else if r < 9 {
                out.push('"');
                let w = self.lexicon.word(&mut self.rng);
                out.push_str(w);
                out.push('"');
            } else if i == 0 || r < 12 {
                let w = self.lexicon.word(&mut self.rng);
                capitalize(w, out);
            } else {
                let w = self.lexicon.word(&mut self.rng);
                out.push_str(w);
            }
            if i + 1 < words && self.rng.chance(8) {
                out.push_str(self.rng.pick(&[",", ",", ";", ":", " -", "'s"]));
            }
        }
        out.push_str(self.rng.pick(&[".", ".", ".", ".", "?", "!", "...", ".\""]));
    }

    fn prose(&mut self, out: &mut String) {
        for _ in 0..2 + self.rng.below(6) {
            self.sentence(out);
            out.push(' ');
        }
        out.pop();
        out.push_str(if self.rng.chance(80) { "\n\n" } else { "\n" });
    }

    fn identifier(&mut self, out: &mut String) {
        let parts = 1 + self.rng.below(3);
        let style = self.rng.below(3);
        for i in 0..parts {
            let w = self.ascii_word().to_string();
            match (style, i) {
                (0, 0) | (1, 0) => out.push_str(&w),
                (0, _) => {
                    out.push('_');
                    out.push_str(&w);
                }
                (1, _) | (2, _) => capitalize(&w, out),
                _ => out.push_str(&w),
            }
        }
    }

    fn expression(&mut self, out: &mut String) {
        match self.rng.below(5) {
            0 => push_number(&mut self.rng, out),
            1 => {
                out.push('"');
                let w = self.lexicon.word(&mut self.rng);
                out.push_str(w);
                out.push('"');
            }
            2 => {
                self.identifier(out);
                out.push('(');
                self.identifier(out);
                out.push(')');
            }
            _ => {
                self.identifier(out);
                out.push_str(self.rng.pick(OPERATORS));
                self.identifier(out);
            }
        }
    }

    fn code(&mut self, out: &mut String) {
        let python = self.rng.chance(50);
        if python {
            out.push_str("def ");
        } else {
            out.push_str(
                self.rng
                    .pick(&["fn ", "pub fn ", "static int ", "function "]),
            );
        }
        self.identifier(out);
        out.push('(');
        for i in 0..self.rng.below(4) {
            if i > 0 {
                out.push_str(", ");
            }
            self.identifier(out);
        }
        out.push_str(if python { "):\n" } else { ") {\n" });
        let mut depth = 1;
        for _ in 0..2 + self.rng.below(8) {
            let indent = if python { "    " } else { "\t" };
            for _ in 0..depth {
                out.push_str(indent);
            }
            match self.rng.below(6) {
                0 if depth < 4 => {
                    out.push_str(self.rng.pick(&["if ", "while ", "for "]));
                    self.expression(out);
                    out.push_str(if python { ":\n" } else { " {\n" });
                    depth += 1;
                    continue;
                }
                1 => {
                    out.push_str("# ");
                    if !python {
                        out.pop();
                        out.pop();
                        out.push_str("// ");
                    }
                    self.sentence(out);
                }
                2 => {
                    out.push_str(self.rng.pick(KEYWORDS));
                    out.push(' ');
                    self.expression(out);
                }
                _ => {
                    if !python {
                        out.push_str("let ");
                    }
                    self.identifier(out);
                    out.push_str(" = ");
                    self.expression(out);
                }
            }
            if !python {
                out.push(';');
            }
            out.push('\n');
            if depth > 1 && self.rng.chance(30) {
                depth -= 1;
                if !python {
                    for _ in 0..depth {
                        out.push('\t');
                    }
                    out.push_str("}\n");
                }
            }
        }
        if !python {
            while depth > 1 {
                depth -= 1;
                for _ in 0..depth {
                    out.push('\t');
                }
                out.push_str("}\n");
            }
            out.push_str("}\n");
        }
        out.push('\n');
    }

    fn data(&mut self, out: &mut String) {
        match self.rng.below(3) {
            0 => {
                out.push('{');
                for i in 0..1 + self.rng.below(5) {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    out.push('"');
                    self.identifier(out);
                    out.push_str("\": ");
                    self.expression(out);
                }
                out.push_str("}\n");
            }
            1 => {
                for _ in 0..2 + self.rng.below(4) {
                    for i in 0..3 {
                        if i > 0 {
                            out.push(',');
                        }
                        if i == 1 {
                            push_number(&mut self.rng, out);
                        } else {
                            let w = self.lexicon.word(&mut self.rng);
                            out.push_str(w);
                        }
                    }
                    out.push_str("\r\n");
                }
            }
            _ => {
                out.push_str(self.rng.pick(&["# ", "## ", "- ", "* ", "1. ", "> "]));
                self.sentence(out);
                out.push('\n');
            }
        }
    }

    fn document(&mut self) -> String {
        let mut out = String::with_capacity(DOCUMENT_BYTES + 1024);
        while out.len() < DOCUMENT_BYTES {
            match self.rng.below(100) {
                0..=64 => self.prose(&mut out),
                65..=84 => self.code(&mut out),
                _ => self.data(&mut out),
            }
        }
        out
    }
}

/// The training texts for a byte-level BPE aiming at `merges` merges.
pub(crate) fn training_corpus(merges: usize) -> Vec<String> {
    let mut rng = Rng::new(0x6d79_7269_6164_2121);
    // Words that end up as tokens, plus their capitalised and space-prefixed variants and
    // the syllable-sized pieces on the way there, make roughly 1.5 merges per lexicon word.
    let lexicon = Lexicon::generate(&mut rng, merges * 2 / 3 + 64);
    // ~12 words per lexicon entry: the uniform share alone then gives every word about four
    // occurrences, in more than one variant.
    let budget_bytes = lexicon.words.len() * 12 * 7;
    let mut generator = Generator {
        rng,
        lexicon: &lexicon,
    };
    let mut docs = Vec::new();
    let mut total = 0;
    while total < budget_bytes {
        let doc = generator.document();
        total += doc.len();
        docs.push(doc);
    }
    for _ in 0..ENGLISH_COPIES {
        docs.push(ENGLISH.to_string());
        docs.push(CHAT.to_string());
    }
    docs
}

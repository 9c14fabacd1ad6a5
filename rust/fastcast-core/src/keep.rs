//! `--keep`: which float tensors keep their dtype, and so what every tensor
//! becomes (in a cast, and in `--quantize`). One rule, here, so the planner,
//! the loss scan and the verifier cannot disagree about it.
//!
//! Patterns are shell globs with exactly the semantics of Python's
//! `fnmatch.fnmatchcase` (CPython's `fnmatch.translate`), edge cases
//! included, matched on Unicode scalar values and case-sensitively:
//!
//! - `*` matches any run of characters, empty, `.` and `/` included;
//! - `?` matches exactly one character;
//! - `[seq]` matches one character in `seq`, `[!seq]` one not in it; `a-z`
//!   inside is a range, a reversed range (`[z-a]`) matches nothing, a `-`
//!   first or last is literal, and a `]` right after `[` or `[!` is a member;
//! - a `[` with no closing `]` is a literal `[`. There is no escaping.

use std::collections::HashSet;

use crate::dtype::DType;
use crate::quant::{self, Linear, Role};
use crate::quantize::Scheme;

/// A set of glob patterns; a name is kept when any of them matches it.
///
/// ```
/// use fastcast_core::KeepRule;
/// let keep = KeepRule::new(&["*norm*", "lm_head.[!b]*"]);
/// assert!(keep.matches("model.layers.0.input_layernorm.weight"));
/// assert!(keep.matches("lm_head.weight"));
/// assert!(!keep.matches("lm_head.bias"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeepRule {
    patterns: Vec<Vec<Token>>,
}

/// One element of a compiled pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    /// Any run of characters (consecutive `*` are folded into one).
    Star,
    /// Exactly one character of this class.
    One(Class),
}

/// What a single-character token accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Class {
    Any,
    Char(char),
    /// `[...]`: members as inclusive ranges (a lone member is `(c, c)`).
    Set {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Class {
    fn accepts(&self, c: char) -> bool {
        match self {
            Class::Any => true,
            Class::Char(x) => *x == c,
            Class::Set { negated, ranges } => {
                ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
            }
        }
    }
}

impl KeepRule {
    /// Compile `patterns`. Every string is a valid pattern, so this cannot fail.
    pub fn new(patterns: &[impl AsRef<str>]) -> KeepRule {
        KeepRule {
            patterns: patterns.iter().map(|p| compile(p.as_ref())).collect(),
        }
    }

    /// True when any pattern matches the whole of `name`.
    pub fn matches(&self, name: &str) -> bool {
        if self.patterns.is_empty() {
            return false;
        }
        let chars: Vec<char> = name.chars().collect();
        self.patterns.iter().any(|p| glob_match(p, &chars))
    }

    /// True when there are no patterns (nothing is kept).
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

/// The dtype tensor `name` gets in a conversion to `target`: its own when it
/// is not a castable float or when `keep` matches it, else `target`.
///
/// ```
/// use fastcast_core::{keep::target_dtype, DType, KeepRule};
/// let keep = KeepRule::new(&["*.norm.weight"]);
/// assert_eq!(target_dtype("a.weight", DType::F32, DType::BF16, &keep), DType::BF16);
/// assert_eq!(target_dtype("a.norm.weight", DType::F32, DType::BF16, &keep), DType::F32);
/// assert_eq!(target_dtype("step", DType::I64, DType::BF16, &keep), DType::I64);
/// ```
pub fn target_dtype(name: &str, src: DType, target: DType, keep: &KeepRule) -> DType {
    if !src.is_castable() || keep.matches(name) {
        src
    } else {
        target
    }
}

/// What every tensor of a conversion to `target` becomes: [`target_dtype`]
/// for each, except that with `quantized` a tensor holding quantization
/// state (see [`quant::roles`]: packed and fp8 weights, scales, zero
/// points, bitsandbytes state, fp32-pinned tensors) keeps its dtype.
///
/// ```
/// use fastcast_core::{keep::target_dtypes, DType, KeepRule};
/// let t = [("l.weight", DType::F8E4M3), ("l.weight_scale_inv", DType::F32),
///          ("norm.weight", DType::F32)];
/// let none = KeepRule::default();
/// assert_eq!(target_dtypes(&t, DType::BF16, &none, true),
///            [DType::F8E4M3, DType::F32, DType::BF16]);
/// assert_eq!(target_dtypes(&t, DType::BF16, &none, false),
///            [DType::BF16, DType::BF16, DType::BF16]);
/// ```
pub fn target_dtypes(
    tensors: &[(impl AsRef<str>, DType)],
    target: DType,
    keep: &KeepRule,
    quantized: bool,
) -> Vec<DType> {
    let roles = if quantized {
        quant::typed_roles(tensors)
    } else {
        vec![Role::Plain; tensors.len()]
    };
    tensors
        .iter()
        .zip(roles)
        .map(|((name, src), role)| match role {
            Role::Plain => target_dtype(name.as_ref(), *src, target, keep),
            _ => *src,
        })
        .collect()
}

/// What `--quantize` does with one tensor of a plain model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fate {
    /// A decoder Linear weight quantized to e4m3, a F32 scale beside it.
    Quantize,
    /// A decoder Linear weight whose shape does not fit the scheme's blocks
    /// (or whose dtype is not F32, BF16 or F16): cast to the target.
    Misfit,
    /// A decoder Linear weight that fits, left unquantized (cast to the
    /// target) because a weight fused with it is a misfit.
    FusedMisfit,
    /// A decoder Linear weight matched by `--keep`: left in its dtype.
    Kept,
    /// A router gate: cast to the target, never quantized.
    Router,
    /// Not a decoder Linear weight: what a conversion of a quantized model
    /// does with it (see [`target_dtypes`]).
    Other,
}

impl Fate {
    /// The fate in words, as Python reads it.
    pub const fn name(self) -> &'static str {
        match self {
            Fate::Quantize => "quantize",
            Fate::Misfit => "misfit",
            Fate::FusedMisfit => "fused misfit",
            Fate::Kept => "kept",
            Fate::Router => "router",
            Fate::Other => "other",
        }
    }
}

/// What `--quantize` makes of one tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Its dtype in the output (F8_E4M3 for a quantized weight).
    pub dtype: DType,
    pub fate: Fate,
    /// For a quantized weight: the rows and columns each scale covers.
    pub block: Option<(u64, u64)>,
    /// For a quantized weight: its F32 scale tensor's name and shape
    /// (`x.weight_scale_inv` `[ceil(out / 128), ceil(in / 128)]`,
    /// `x.weight_scale` `[out, 1]`).
    pub scale: Option<(String, Vec<u64>)>,
}

/// What `--quantize` in `scheme` makes of every tensor `(name, dtype, shape)`
/// of a plain model converted to `target` (None: every tensor not quantized
/// keeps its dtype): its dtype, its fate and, for a quantized weight, the block
/// each scale covers.
///
/// A decoder Linear weight (see [`quant::linear`]) is quantized unless `keep`
/// matches it, its shape does not fit the scheme, or a weight fused with it
/// (see [`quant::fused_siblings`]) does not fit; everything else gets
/// [`target_dtypes`] of a quantized model (fp32-pinned tensors stay fp32).
///
/// ```
/// use fastcast_core::keep::{quantize_targets, Fate};
/// use fastcast_core::{quantize::Scheme, DType, KeepRule};
/// let t = [("model.layers.0.mlp.up_proj.weight", DType::BF16, vec![256, 128]),
///          ("model.layers.0.mlp.down_proj.weight", DType::BF16, vec![128, 200]),
///          ("model.norm.weight", DType::BF16, vec![128])];
/// let got = quantize_targets(&t, Some(DType::BF16), &KeepRule::default(), Scheme::Fp8Block);
/// let fates: Vec<_> = got.iter().map(|x| (x.dtype, x.fate, x.block)).collect();
/// assert_eq!(fates, [(DType::F8E4M3, Fate::Quantize, Some((128, 128))),
///                    (DType::BF16, Fate::Misfit, None),
///                    (DType::BF16, Fate::Other, None)]);
/// ```
pub fn quantize_targets(
    tensors: &[(impl AsRef<str>, DType, impl AsRef<[u64]>)],
    target: Option<DType>,
    keep: &KeepRule,
    scheme: Scheme,
) -> Vec<Target> {
    let typed: Vec<(&str, DType)> = tensors.iter().map(|(n, d, _)| (n.as_ref(), *d)).collect();
    // No target: every tensor not quantized keeps its own dtype (as llm-compressor's
    // model-free quantization does).
    let base = match target {
        Some(target) => target_dtypes(&typed, target, keep, true),
        None => typed.iter().map(|(_, d)| *d).collect(),
    };
    let quantizable = [DType::F32, DType::BF16, DType::F16];
    let mut fates: Vec<Fate> = tensors
        .iter()
        .map(|(name, dtype, shape)| {
            let (name, shape) = (name.as_ref(), shape.as_ref());
            match quant::linear(name, *dtype, shape) {
                Linear::Other => Fate::Other,
                Linear::Router => Fate::Router,
                Linear::Decoder if keep.matches(name) => Fate::Kept,
                Linear::Decoder if quantizable.contains(dtype) && scheme.fits(shape) => {
                    Fate::Quantize
                }
                Linear::Decoder => Fate::Misfit,
            }
        })
        .collect();
    let misfits: HashSet<&str> = typed
        .iter()
        .zip(&fates)
        .filter(|(_, f)| **f == Fate::Misfit)
        .map(|((n, _), _)| *n)
        .collect();
    for ((name, _), fate) in typed.iter().zip(fates.iter_mut()) {
        if *fate == Fate::Quantize
            && quant::fused_siblings(name)
                .iter()
                .any(|s| misfits.contains(s.as_str()))
        {
            *fate = Fate::FusedMisfit;
        }
    }
    tensors
        .iter()
        .zip(fates)
        .zip(base)
        .map(|(((name, src, shape), fate), base)| {
            let dtype = match fate {
                Fate::Quantize => DType::F8E4M3,
                Fate::Misfit | Fate::FusedMisfit => target.unwrap_or(*src),
                Fate::Kept => *src,
                Fate::Router | Fate::Other => base,
            };
            let (block, scale) = match fate {
                Fate::Quantize => {
                    let (shape, name) = (shape.as_ref(), name.as_ref());
                    let block = scheme.block(shape);
                    let grid = vec![shape[0].div_ceil(block.0), shape[1].div_ceil(block.1)];
                    let module = name.strip_suffix(".weight").unwrap_or(name);
                    let scale = format!("{module}.{}", scheme.scale_suffix());
                    (Some(block), Some((scale, grid)))
                }
                _ => (None, None),
            };
            Target {
                dtype,
                fate,
                block,
                scale,
            }
        })
        .collect()
}

/// Compile a pattern the way CPython's `fnmatch.translate` reads it.
fn compile(pattern: &str) -> Vec<Token> {
    let pat: Vec<char> = pattern.chars().collect();
    let n = pat.len();
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        let c = pat[i];
        i += 1;
        match c {
            '*' => {
                if out.last() != Some(&Token::Star) {
                    out.push(Token::Star);
                }
            }
            '?' => out.push(Token::One(Class::Any)),
            '[' => {
                // The closing `]`: a `]` first (after an optional `!`) is a member.
                let mut j = i;
                if j < n && pat[j] == '!' {
                    j += 1;
                }
                if j < n && pat[j] == ']' {
                    j += 1;
                }
                while j < n && pat[j] != ']' {
                    j += 1;
                }
                if j >= n {
                    out.push(Token::One(Class::Char('[')));
                } else {
                    out.push(Token::One(bracket(&pat[i..j])));
                    i = j + 1;
                }
            }
            c => out.push(Token::One(Class::Char(c))),
        }
    }
    out
}

/// A piece of a bracket expression once its ranges are found.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Piece {
    Lit(char),
    /// A `-` between two chunks: the characters either side form a range.
    Dash,
}

/// The class of a bracket expression's contents (`stuff`, between `[` and `]`).
///
/// Follows `fnmatch.translate` step by step: split at range dashes into
/// chunks (a dash first, right after `!`, or right after a range end is
/// literal), drop reversed ranges together with both their ends, then read
/// what is left as the regex character class CPython builds from it.
fn bracket(stuff: &[char]) -> Class {
    let pieces: Vec<Piece> = if !stuff.contains(&'-') {
        stuff.iter().map(|&c| Piece::Lit(c)).collect()
    } else {
        let mut chunks: Vec<Vec<char>> = Vec::new();
        let mut start = 0;
        let mut k = if stuff[0] == '!' { 2 } else { 1 };
        while let Some(dash) = stuff
            .get(k..)
            .and_then(|rest| rest.iter().position(|&c| c == '-'))
            .map(|p| p + k)
        {
            chunks.push(stuff[start..dash].to_vec());
            start = dash + 1;
            k = dash + 3;
        }
        if start < stuff.len() {
            chunks.push(stuff[start..].to_vec());
        } else if let Some(last) = chunks.last_mut() {
            last.push('-'); // a trailing dash is literal
        }
        // Remove empty (reversed) ranges, back to front, as CPython does.
        for k in (1..chunks.len()).rev() {
            let (before, after) = (chunks[k - 1].last(), chunks[k].first());
            if let (Some(&a), Some(&b)) = (before, after) {
                if a > b {
                    let tail = chunks.remove(k);
                    chunks[k - 1].pop();
                    chunks[k - 1].extend_from_slice(&tail[1..]);
                }
            }
        }
        let mut pieces = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            if i > 0 {
                pieces.push(Piece::Dash);
            }
            pieces.extend(chunk.iter().map(|&c| Piece::Lit(c)));
        }
        pieces
    };
    match pieces.as_slice() {
        // An empty class never matches; `[!]` (negated empty) matches anything.
        [] => Class::Set {
            negated: false,
            ranges: Vec::new(),
        },
        [Piece::Lit('!')] => Class::Any,
        [Piece::Lit('!'), rest @ ..] => Class::Set {
            negated: true,
            ranges: class_ranges(rest),
        },
        all => Class::Set {
            negated: false,
            ranges: class_ranges(all),
        },
    }
}

/// Read pieces as a regex character class does: `x Dash y` is a range,
/// any other character (a leading dash included) is itself.
fn class_ranges(pieces: &[Piece]) -> Vec<(char, char)> {
    let as_char = |p: Piece| match p {
        Piece::Lit(c) => c,
        Piece::Dash => '-',
    };
    let mut ranges = Vec::new();
    let mut i = 0;
    while i < pieces.len() {
        let lo = as_char(pieces[i]);
        if pieces[i] != Piece::Dash
            && pieces.get(i + 1) == Some(&Piece::Dash)
            && i + 2 < pieces.len()
        {
            ranges.push((lo, as_char(pieces[i + 2])));
            i += 3;
        } else {
            ranges.push((lo, lo));
            i += 1;
        }
    }
    ranges
}

/// Whole-string match with one backtrack point: the last `*` seen. Every
/// other token matches exactly one character, so moving that `*` one
/// character further is the only choice worth retrying.
fn glob_match(pattern: &[Token], name: &[char]) -> bool {
    let (mut p, mut s) = (0, 0);
    let mut star: Option<(usize, usize)> = None; // (token after the star, name position)
    while s < name.len() {
        match pattern.get(p) {
            Some(Token::Star) => {
                p += 1;
                star = Some((p, s));
            }
            Some(Token::One(class)) if class.accepts(name[s]) => {
                p += 1;
                s += 1;
            }
            _ => match star {
                Some((after, from)) => {
                    p = after;
                    s = from + 1;
                    star = Some((after, from + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|t| *t == Token::Star)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, name: &str) -> bool {
        KeepRule::new(&[pattern]).matches(name)
    }

    #[test]
    fn star_matches_any_run_dots_and_slashes_included() {
        assert!(m("*", ""));
        assert!(m("*", "a.b/c"));
        assert!(m(
            "*norm*",
            "model.layers.0.post_attention_layernorm.weight"
        ));
        assert!(m("a*b*c", "abc"));
        assert!(m("a*b*c", "a.x/b.y/c"));
        assert!(!m("a*b*c", "a.x/b.y/cd"));
        assert!(m("a**c", "ac"));
        assert!(m("*.weight", ".weight"));
        assert!(!m("*.weight", "weight"));
        assert!(m("*a*a*a*", "aaa"));
        assert!(!m("*a*a*a*", "aa"));
        assert!(m("unet/*", "unet/down/0.weight"));
    }

    #[test]
    fn question_mark_is_exactly_one_character() {
        assert!(m("?", "x"));
        assert!(m("?", "/"));
        assert!(!m("?", ""));
        assert!(!m("?", "xy"));
        assert!(m("layers.?.w", "layers.7.w"));
        assert!(!m("layers.?.w", "layers.17.w"));
        assert!(m("?", "é"), "one Unicode scalar value, not one byte");
        assert!(m("?", "\n"));
    }

    #[test]
    fn literals_are_case_sensitive_and_whole() {
        assert!(m("lm_head.weight", "lm_head.weight"));
        assert!(!m("lm_head.weight", "LM_HEAD.weight"));
        assert!(!m("lm_head", "lm_head.weight"));
        assert!(!m("head.weight", "lm_head.weight"));
        assert!(m("", ""));
        assert!(!m("", "a"));
        assert!(m("a\\b", "a\\b"), "no escaping: a backslash is a character");
        assert!(
            m("^$.+(|){}", "^$.+(|){}"),
            "regex metacharacters are literal"
        );
    }

    #[test]
    fn sets_ranges_and_negation() {
        assert!(m("[abc]", "b"));
        assert!(!m("[abc]", "d"));
        assert!(m("[!abc]", "d"));
        assert!(!m("[!abc]", "a"));
        assert!(m("[a-c]", "b"));
        assert!(!m("[a-c]", "d"));
        assert!(m("[!a-c]", "d"));
        assert!(m("[a-cx-z]", "y"));
        assert!(!m("[a-cx-z]", "m"));
        assert!(m("[0-9]", "7"));
        assert!(m("[!/]", "a"));
        assert!(!m("[!/]", "/"));
        assert!(!m("[ab]", ""));
        assert!(!m("[ab]", "ab"));
        assert!(m("[^a]", "^"), "^ is a member, not negation");
        assert!(!m("[^a]", "b"));
        assert!(m("[[]", "["));
        assert!(m("[a&&b]", "&"), "no regex set operations");
        assert!(m("[a||b]", "|"));
    }

    #[test]
    fn dashes_first_last_or_after_a_range_are_literal() {
        assert!(m("[-a]", "-"));
        assert!(m("[a-]", "-"));
        assert!(m("[!-a]", "b"));
        assert!(!m("[!-a]", "-"));
        assert!(m("[!-]", "a"));
        assert!(!m("[!-]", "-"));
        assert!(m("[a-c-e]", "-"));
        assert!(m("[a-c-e]", "e"));
        assert!(!m("[a-c-e]", "d"));
        assert!(m("[--/]", "."), "a range from - to /");
        assert!(m("[a-b-]", "-"));
    }

    #[test]
    fn a_closing_bracket_first_is_a_member() {
        assert!(m("[]]", "]"));
        assert!(!m("[]]", "a"));
        assert!(m("[]a]", "a"));
        assert!(m("[!]]", "a"));
        assert!(!m("[!]]", "]"));
        assert!(m("[]-a]", "^"), "a range from ] to a");
        assert!(m("[]-]", "-"));
        assert!(m("[!]-a]", "b"));
        assert!(!m("[!]-a]", "_"));
    }

    #[test]
    fn an_unclosed_bracket_is_a_literal() {
        assert!(m("[", "["));
        assert!(m("[a", "[a"));
        assert!(!m("[a", "a"));
        assert!(m("[]", "[]"));
        assert!(m("[!]", "[!]"));
        assert!(m("[!", "[!"));
        assert!(m("a[*", "a[xyz"));
        assert!(m("[[a]", "a"), "a [ inside a set is a member");
        assert!(m("[[a]", "["));
        assert!(!m("[[a]", "[a]"));
    }

    #[test]
    fn reversed_ranges_match_nothing_and_take_their_ends_along() {
        assert!(!m("[z-a]", "z"));
        assert!(!m("[z-a]", "a"));
        assert!(!m("[z-a]", "m"));
        assert!(!m("[z-a]", "-"));
        assert!(m("[!z-a]", "z"), "negated empty: anything");
        assert!(m("[xz-a]", "x"));
        assert!(!m("[xz-a]", "z"));
        assert!(m("[z-a-c]", "-"));
        assert!(m("[z-a-c]", "c"));
        assert!(!m("[z-a-c]", "b"));
        // What is left can read differently: "!" alone, or "!" then a class.
        assert!(m("[z-a!]", "q"), "left with [!]: any character");
        assert!(m("[z-a!b]", "c"), "left with [!b]");
        assert!(!m("[z-a!b]", "b"));
        assert!(!m("[z-a!-c]", "-"), "left with [!-c]: the dash is literal");
        assert!(!m("[z-a!-c]", "c"));
        assert!(m("[z-a!-c]", "b"));
        assert!(m("[a-bz-c]", "b"));
        assert!(!m("[a-bz-c]", "z"));
    }

    #[test]
    fn non_ascii_ranges_use_scalar_values() {
        assert!(m("[à-ÿ]", "é"));
        assert!(!m("[à-ÿ]", "e"));
        assert!(m("*ß", "straß"));
    }

    #[test]
    fn backtracking_is_linear_ish() {
        let name = "a".repeat(5000);
        let pattern = format!("{}b", "*a".repeat(50));
        assert!(!m(&pattern, &name));
    }

    #[test]
    fn any_pattern_keeps() {
        let keep = KeepRule::new(&["*.norm.weight", "lm_head.*"]);
        assert!(keep.matches("x.norm.weight"));
        assert!(keep.matches("lm_head.weight"));
        assert!(!keep.matches("x.weight"));
        let none = KeepRule::new(&[] as &[&str]);
        assert!(none.is_empty() && !none.matches(""));
    }

    #[test]
    fn target_dtype_casts_only_unkept_castable_floats() {
        let keep = KeepRule::new(&["*norm*"]);
        let t = |name, src| target_dtype(name, src, DType::F16, &keep);
        assert_eq!(t("w", DType::F32), DType::F16);
        assert_eq!(t("w", DType::BF16), DType::F16);
        assert_eq!(t("w", DType::F8E4M3), DType::F16);
        assert_eq!(t("layernorm.w", DType::F32), DType::F32);
        assert_eq!(t("w", DType::I64), DType::I64);
        assert_eq!(t("w", DType::Bool), DType::Bool);
        assert_eq!(t("w", DType::F4), DType::F4, "packed floats are never cast");
        assert_eq!(t("w", DType::F8E8M0), DType::F8E8M0);
    }

    fn fates(t: &[(&str, DType, Vec<u64>)], keep: &[&str], scheme: Scheme) -> Vec<Fate> {
        quantize_targets(t, Some(DType::BF16), &KeepRule::new(keep), scheme)
            .into_iter()
            .map(|x| x.fate)
            .collect()
    }

    #[test]
    fn quantize_takes_decoder_linears_that_fit_and_their_fused_groups_whole() {
        let p = "model.layers.0";
        let t = [
            (
                format!("{p}.self_attn.q_proj.weight"),
                DType::BF16,
                vec![256, 256],
            ),
            (
                format!("{p}.self_attn.k_proj.weight"),
                DType::BF16,
                vec![64, 256],
            ),
            (
                format!("{p}.self_attn.v_proj.weight"),
                DType::BF16,
                vec![64, 256],
            ),
            (
                format!("{p}.self_attn.o_proj.weight"),
                DType::BF16,
                vec![256, 256],
            ),
            (format!("{p}.mlp.gate.weight"), DType::BF16, vec![4, 256]),
            (
                format!("{p}.mlp.gate.e_score_correction_bias"),
                DType::F32,
                vec![4],
            ),
            (
                format!("{p}.input_layernorm.weight"),
                DType::BF16,
                vec![256],
            ),
            ("lm_head.weight".to_string(), DType::F32, vec![128, 256]),
        ];
        let t: Vec<(&str, DType, Vec<u64>)> = t
            .iter()
            .map(|(n, d, s)| (n.as_str(), *d, s.clone()))
            .collect();
        let got = quantize_targets(&t, Some(DType::F16), &KeepRule::default(), Scheme::Fp8Block);
        let found: Vec<Fate> = got.iter().map(|x| x.fate).collect();
        assert_eq!(
            found,
            [
                Fate::FusedMisfit,
                Fate::Misfit,
                Fate::Misfit,
                Fate::Quantize,
                Fate::Router,
                Fate::Other,
                Fate::Other,
                Fate::Other
            ]
        );
        let dtypes: Vec<DType> = got.iter().map(|x| x.dtype).collect();
        assert_eq!(
            dtypes,
            [
                DType::F16,
                DType::F16,
                DType::F16,
                DType::F8E4M3,
                DType::F16,
                DType::F32, // pinned, as in a quantized model
                DType::F16,
                DType::F16
            ]
        );
        // Per channel, every decoder Linear fits; --keep keeps one in its dtype.
        let per_channel = fates(&t, &["*.k_proj.weight"], Scheme::Fp8Channel);
        assert_eq!(
            &per_channel[..5],
            [
                Fate::Quantize,
                Fate::Kept,
                Fate::Quantize,
                Fate::Quantize,
                Fate::Router
            ]
        );
        let kept = quantize_targets(
            &t,
            Some(DType::F16),
            &KeepRule::new(&["*.k_proj.weight"]),
            Scheme::Fp8Channel,
        );
        assert_eq!(kept[1].dtype, DType::BF16);
        assert_eq!(kept[0].block, Some((1, 256)));
        let scale = Some((
            "model.layers.0.self_attn.q_proj.weight_scale".into(),
            vec![256, 1],
        ));
        assert_eq!(kept[0].scale, scale);
        let block = &got[3].scale;
        let o_proj = "model.layers.0.self_attn.o_proj.weight_scale_inv".to_string();
        assert_eq!(block, &Some((o_proj, vec![2, 2])));
        // No target: what is not quantized keeps its own dtype, misfits included.
        let own = quantize_targets(&t, None, &KeepRule::default(), Scheme::Fp8Block);
        for ((_, src, _), x) in t.iter().zip(&own) {
            let want = if x.fate == Fate::Quantize {
                DType::F8E4M3
            } else {
                *src
            };
            assert_eq!(x.dtype, want);
        }
    }

    #[test]
    fn only_f32_bf16_and_f16_weights_are_quantized() {
        let t = [
            ("m.layers.0.fc.weight", DType::F64, vec![128, 128]),
            ("m.layers.0.fc2.weight", DType::F16, vec![128, 128]),
            ("m.layers.0.fc3.weight", DType::F8E4M3, vec![128, 128]),
        ];
        assert_eq!(
            fates(&t, &[], Scheme::Fp8Block),
            [Fate::Misfit, Fate::Quantize, Fate::Misfit]
        );
    }
}

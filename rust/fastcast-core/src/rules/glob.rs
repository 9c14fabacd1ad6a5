//! `--keep` patterns: shell globs with exactly the semantics of Python's
//! `fnmatch.fnmatchcase` (CPython's `fnmatch.translate`), edge cases
//! included, matched on Unicode scalar values and case-sensitively. One
//! engine, here, so the planner, the loss scan and the verifier cannot
//! disagree about what `--keep` keeps:
//!
//! - `*` matches any run of characters, empty, `.` and `/` included;
//! - `?` matches exactly one character;
//! - `[seq]` matches one character in `seq`, `[!seq]` one not in it; `a-z`
//!   inside is a range, a reversed range (`[z-a]`) matches nothing, a `-`
//!   first or last is literal, and a `]` right after `[` or `[!` is a member;
//! - a `[` with no closing `]` is a literal `[`. There is no escaping.

/// A set of glob patterns; a name is kept when any of them matches it.
///
/// ```
/// use fastcast_core::rules::glob::KeepRule;
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
}

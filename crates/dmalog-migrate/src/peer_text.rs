//! Text that came from the peer (abort reasons), made safe to print: a hostile peer must
//! not be able to drive the terminal (escape sequences, a cleared screen, fake log lines)
//! or flood it.

/// Characters of peer text kept at most; the rest is cut (marked with `...`).
pub const MAX_PEER_TEXT_CHARS: usize = 256;

/// `bytes` as printable text: invalid UTF-8 replaced, control characters and the
/// invisible ones that reorder or hide text escaped as `\u{..}` (`\n`, `\t` as such),
/// at most [`MAX_PEER_TEXT_CHARS`] characters.
pub fn sanitize(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len().min(MAX_PEER_TEXT_CHARS * 2));
    for (index, c) in text.chars().enumerate() {
        if index == MAX_PEER_TEXT_CHARS {
            out.push_str("...");
            break;
        }
        if needs_escape(c) {
            match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                _ => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_invisible_characters_are_escaped() {
        assert_eq!(sanitize(b"\x1b[2J\nbye"), "\\u{1b}[2J\\nbye");
        assert_eq!(sanitize("a\u{202e}b".as_bytes()), "a\\u{202e}b");
        assert_eq!(sanitize(b"\x07\x7f\r\t"), "\\u{7}\\u{7f}\\r\\t");
        assert_eq!(sanitize(b"plain: text, caf\xc3\xa9"), "plain: text, café");
        assert_eq!(sanitize(b"\xff"), "\u{fffd}");
        let long = sanitize(&[b'x'; 1000]);
        assert_eq!(long.len(), MAX_PEER_TEXT_CHARS + 3);
        assert!(long.ends_with("..."));
    }
}

//! What a client may put in a room: text, names, emoji, member lists.

use chat_model::UserId;

use crate::RoomError;

/// Limits on what clients write.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The most characters (Unicode scalar values) a message's text may have.
    pub max_text_chars: usize,
    /// The most members a room may be created with.
    pub max_initial_members: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_text_chars: 4_000,
            max_initial_members: 1_000,
        }
    }
}

/// Whether `c` shows nothing by itself: Unicode's default-ignorable code points (zero-width
/// spaces and joiners, direction marks, variation selectors, tags, the soft hyphen…) and the
/// Hangul fillers that render blank.
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{FFF0}'..='\u{FFF8}' | '\u{1BCA0}'..='\u{1BCA3}'
        | '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E0FFF}')
}

/// Whether `s` would show as nothing: empty, or only white space and invisible characters.
fn blank(s: &str) -> bool {
    s.chars().all(|c| c.is_whitespace() || invisible(c))
}

/// Message text: not blank, within the limit, no control characters but newline and tab.
pub fn validate_text(text: &str, limits: &Limits) -> Result<(), RoomError> {
    if blank(text) {
        return Err(RoomError::BadRequest("text is empty".into()));
    }
    let chars = text.chars().count();
    if chars > limits.max_text_chars {
        return Err(RoomError::TooLarge(format!(
            "text has {chars} characters, more than the {} allowed",
            limits.max_text_chars
        )));
    }
    if let Some(c) = text
        .chars()
        .find(|c| c.is_control() && *c != '\n' && *c != '\t')
    {
        return Err(RoomError::BadRequest(format!(
            "text contains the control character U+{:04X}",
            c as u32
        )));
    }
    Ok(())
}

/// An emoji (or short reaction name): 1 to 64 bytes, no whitespace or control characters.
pub fn validate_emoji(emoji: &str) -> Result<(), RoomError> {
    if blank(emoji)
        || emoji.len() > 64
        || emoji.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(RoomError::BadRequest(
            "emoji must be 1 to 64 bytes without spaces or control characters".into(),
        ));
    }
    Ok(())
}

/// A room name: 1 to 200 characters, not blank, no control characters.
pub(crate) fn validate_name(name: &str) -> Result<(), RoomError> {
    if blank(name) {
        return Err(RoomError::BadRequest(
            "name must not be empty (leave it out for the room id)".into(),
        ));
    }
    if name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(RoomError::BadRequest(
            "name must be at most 200 characters without control characters".into(),
        ));
    }
    Ok(())
}

/// The initial members: deduplicated, the creator left out (they join anyway), bounded.
pub(crate) fn members(
    creator: &UserId,
    mut members: Vec<UserId>,
) -> Result<Vec<UserId>, RoomError> {
    members.sort();
    members.dedup();
    members.retain(|m| m != creator);
    let limit = Limits::default().max_initial_members;
    if members.len() > limit {
        return Err(RoomError::BadRequest(format!(
            "a room is created with at most {limit} members"
        )));
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_rules() {
        let l = Limits::default();
        assert!(validate_text("hi\nthere\t!", &l).is_ok());
        assert!(validate_text("émoji 👍", &l).is_ok());
        assert!(matches!(
            validate_text("", &l),
            Err(RoomError::BadRequest(_))
        ));
        assert!(matches!(
            validate_text("  \n", &l),
            Err(RoomError::BadRequest(_))
        ));
        for invisible in [
            "\u{200B}",
            " \u{200B}\u{FEFF} ",
            "\u{2060}\u{00AD}",
            "\u{3164}",
        ] {
            assert!(
                matches!(validate_text(invisible, &l), Err(RoomError::BadRequest(_))),
                "{invisible:?}"
            );
            assert!(validate_name(invisible).is_err(), "{invisible:?}");
            assert!(validate_emoji(invisible).is_err(), "{invisible:?}");
        }
        // Invisible characters inside something visible are fine (a family emoji is joined
        // by U+200D).
        assert!(validate_text("👨\u{200D}👩\u{200D}👧", &l).is_ok());
        assert!(validate_emoji("👨\u{200D}👩\u{200D}👧").is_ok());
        assert!(validate_name("a\u{200B}b").is_ok());
        assert!(matches!(
            validate_text("a\u{0}b", &l),
            Err(RoomError::BadRequest(_))
        ));
        assert!(matches!(
            validate_text("a\u{1b}[31m", &l),
            Err(RoomError::BadRequest(_))
        ));
        assert!(
            validate_text(&"é".repeat(4_000), &l).is_ok(),
            "characters, not bytes"
        );
        assert!(matches!(
            validate_text(&"a".repeat(4_001), &l),
            Err(RoomError::TooLarge(_))
        ));
    }

    #[test]
    fn emoji_rules() {
        assert!(validate_emoji("👍").is_ok());
        assert!(validate_emoji(":party:").is_ok());
        for bad in ["", "a b", "\n", &"x".repeat(65)] {
            assert!(validate_emoji(bad).is_err(), "{bad:?}");
        }
    }
}

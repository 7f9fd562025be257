//! Naming rules every client must follow, so names are safe in URLs, logs
//! and subjects (PROTOCOL.md §4 and §5). A refused name is `invalid_name`.

/// Space names: 1–64 of `A-Z a-z 0-9 . _ -`.
pub fn validate_space_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 64 {
        return Err("must be 1 to 64 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("may contain only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// Channel names: 1–256 bytes, no control characters.
pub fn validate_channel_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 256 {
        return Err("channel name must be 1 to 256 bytes");
    }
    if name.chars().any(char::is_control) {
        return Err("channel name must not contain control characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_space_name("demo-1.v2_x").is_ok());
        assert!(validate_space_name("").is_err());
        assert!(validate_space_name("a/b").is_err());
        assert!(validate_space_name(&"a".repeat(65)).is_err());
        assert!(validate_channel_name("chat/lobby é").is_ok());
        assert!(validate_channel_name("bad\nname").is_err());
        assert!(validate_channel_name(&"c".repeat(257)).is_err());
    }
}

//! Durations as DESIGN.md writes them: `500ms`, `10s`, `5m`, `1h`, and days (`7d`), or a
//! sum of such parts (`1m30s`, `1d12h`).

use std::time::Duration;

/// Parses a duration; a bare number is refused, because a unit left out is a unit
/// guessed.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("{s:?} is not a duration like 500ms, 10s, 5m, 1h or 7d");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(err());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(err)?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(err)?),
            "d" => Duration::from_secs(n.checked_mul(86_400).ok_or_else(err)?),
            _ => return Err(err()),
        };
        total = total.checked_add(part).ok_or_else(err)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok: &[(&str, u64)] = &[
            ("500ms", 500),
            ("10s", 10_000),
            ("5m", 300_000),
            ("1h", 3_600_000),
            ("1m30s", 90_000),
            ("7d", 7 * 86_400_000),
            ("1d12h", 36 * 3_600_000),
            ("365d", 365 * 86_400_000),
            ("0s", 0),
        ];
        for (s, ms) in ok {
            assert_eq!(
                parse_duration(s).unwrap(),
                Duration::from_millis(*ms),
                "{s}"
            );
        }
        for s in [
            "",
            "10",
            "s",
            "10x",
            "1.5s",
            "-1s",
            "10 s",
            "99999999999999999999h",
            "213503982334602d",
            "d",
            "1dd",
            "1D",
            "1w",
        ] {
            assert!(parse_duration(s).is_err(), "{s:?}");
        }
        // Overflow of the sum, not of one part.
        assert!(parse_duration("213503982334600d213503982334600d").is_err());
        let e = parse_duration("7x").unwrap_err();
        assert!(e.contains("\"7x\"") && e.contains("7d"), "{e}");
    }
}

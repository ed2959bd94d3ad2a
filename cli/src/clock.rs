//! Times for people: an age (`3m ago`, `in 2h`) or a local date-time, never raw epoch
//! milliseconds (those stay in `-o json` and `-o yaml`).
//!
//! The local offset is read once, first thing in `main`, while the process has one
//! thread: the `time` crate refuses to read it later (another thread could change the
//! environment under it). Where it cannot be read, times are shown in UTC and say so.

use std::sync::OnceLock;

use time::{OffsetDateTime, UtcOffset};

static LOCAL_OFFSET: OnceLock<Option<UtcOffset>> = OnceLock::new();

/// Reads the local offset; call before any other thread starts.
pub fn init_local_offset() {
    LOCAL_OFFSET.get_or_init(|| UtcOffset::current_local_offset().ok());
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How long ago `at_ms` was (or how far ahead), in the largest whole unit: `12s ago`,
/// `3m ago`, `5h ago`, `2d ago`, `in 4m`. Zero means never.
pub fn age(now_ms: u64, at_ms: u64) -> String {
    if at_ms == 0 {
        return "never".into();
    }
    let (ms, future) = if at_ms > now_ms {
        (at_ms - now_ms, true)
    } else {
        (now_ms - at_ms, false)
    };
    let s = ms / 1000;
    let n = match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    };
    if future {
        format!("in {n}")
    } else {
        format!("{n} ago")
    }
}

/// `at_ms` as a local date-time, `2025-03-01 14:05:09`, or in UTC with `UTC` after it when
/// the local offset is unknown. Zero means never.
pub fn local(at_ms: u64) -> String {
    date_time(at_ms, LOCAL_OFFSET.get().copied().flatten())
}

fn date_time(at_ms: u64, offset: Option<UtcOffset>) -> String {
    if at_ms == 0 {
        return "never".into();
    }
    let Ok(t) =
        OffsetDateTime::from_unix_timestamp(i64::try_from(at_ms / 1000).unwrap_or(i64::MAX))
    else {
        return format!("{at_ms} ms");
    };
    let (t, zone) = match offset {
        Some(o) => (t.to_offset(o), ""),
        None => (t, " UTC"),
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}{zone}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_in_the_largest_whole_unit() {
        let now = 1_700_000_000_000;
        let cases: &[(u64, &str)] = &[
            (0, "0s ago"),
            (999, "0s ago"),
            (12_000, "12s ago"),
            (59_999, "59s ago"),
            (60_000, "1m ago"),
            (3 * 60_000 + 5_000, "3m ago"),
            (3_599_000, "59m ago"),
            (3_600_000, "1h ago"),
            (5 * 3_600_000, "5h ago"),
            (86_399_000, "23h ago"),
            (86_400_000, "1d ago"),
            (40 * 86_400_000, "40d ago"),
        ];
        for (ago, want) in cases {
            assert_eq!(age(now, now - ago), *want, "{ago} ms ago");
        }
        assert_eq!(age(now, now + 4 * 60_000), "in 4m");
        assert_eq!(age(now, now + 2 * 86_400_000), "in 2d");
        assert_eq!(age(now, 0), "never");
    }

    #[test]
    fn date_times_local_or_said_utc() {
        // 2023-11-14 22:13:20 UTC.
        let at = 1_700_000_000_123;
        assert_eq!(date_time(at, None), "2023-11-14 22:13:20 UTC");
        let plus2 = UtcOffset::from_hms(2, 0, 0).unwrap();
        assert_eq!(date_time(at, Some(plus2)), "2023-11-15 00:13:20");
        let minus5 = UtcOffset::from_hms(-5, -30, 0).unwrap();
        assert_eq!(date_time(at, Some(minus5)), "2023-11-14 16:43:20");
        assert_eq!(date_time(0, None), "never");
        // Past what a date can hold: no panic, the raw value.
        assert!(date_time(u64::MAX, None).ends_with(" ms"));
        // `local` is one of the two forms, whatever this machine's zone.
        let l = local(at);
        assert!(l.starts_with("2023-11-1"), "{l}");
        assert!(!l.contains("1700000000"), "{l}");
    }
}

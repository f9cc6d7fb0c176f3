//! Timestamps and durations as the tables show them.

const SECONDS_PER_DAY: u64 = 86_400;

/// Seconds since the Unix epoch as RFC 3339 in UTC, to the second: `2026-11-22T07:14:46Z`.
pub fn rfc3339(unix: u64) -> String {
    let (year, month, day) = civil_from_days(unix / SECONDS_PER_DAY);
    let secs = unix % SECONDS_PER_DAY;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01.
///
/// Counts in 400-year eras starting on 1 March, so that the leap day ends a year: an era is
/// always 146 097 days and within it the year of a day follows from the 4/100/400 rules alone.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // 0000-03-01 is 719 468 days before 1970-01-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months from March: 31, 30, 31, 30, 31, 31, 30, 31, 30, 31, 31, 28/29 days; 153 days
    // per five months.
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

/// A duration the way `kubectl` shows ages: `850ms`, `42s`, `5m12s`, `3h4m`, `2d5h`.
pub fn age(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..SECONDS_PER_DAY => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / SECONDS_PER_DAY, s % SECONDS_PER_DAY / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        for (unix, want) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (951_955_199, "2000-03-01T23:59:59Z"),
            (1_709_164_800, "2024-02-29T00:00:00Z"),
            (1_795_331_392, "2026-11-22T07:09:52Z"),
            (4_102_444_800, "2100-01-01T00:00:00Z"),
            (4_107_456_000, "2100-02-28T00:00:00Z"),
            (4_107_542_400, "2100-03-01T00:00:00Z"),
            (253_402_300_799, "9999-12-31T23:59:59Z"),
        ] {
            assert_eq!(rfc3339(unix), want, "{unix}");
        }
    }

    /// Every day for 1000 years follows the one before it.
    #[test]
    fn days_are_consecutive() {
        let mut prev = civil_from_days(0);
        assert_eq!(prev, (1970, 1, 1));
        for d in 1..365_250 {
            let next = civil_from_days(d);
            let (y, m, day) = prev;
            let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
            let month_len = match m {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            let want = if day < month_len {
                (y, m, day + 1)
            } else if m < 12 {
                (y, m + 1, 1)
            } else {
                (y + 1, 1, 1)
            };
            assert_eq!(next, want, "day {d}");
            prev = next;
        }
    }

    #[test]
    fn ages() {
        assert_eq!(age(0), "0ms");
        assert_eq!(age(999), "999ms");
        assert_eq!(age(1_000), "1s");
        assert_eq!(age(59_999), "59s");
        assert_eq!(age(60_000), "1m0s");
        assert_eq!(age(3_599_000), "59m59s");
        assert_eq!(age(3_600_000), "1h0m");
        assert_eq!(age(86_400_000), "1d0h");
        assert_eq!(age(90_061_000), "1d1h");
    }
}

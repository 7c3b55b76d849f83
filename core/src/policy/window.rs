//! UTC time windows (days of week and hour ranges) and their boundaries.
//!
//! A cached decision that depended on a window must not outlive the window's
//! next boundary, so every window can say when its answer next changes.

use serde::Deserialize;

const DAY: u64 = 86_400;
const DAY_NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// Days of week (`mon`..`sun`); empty = every day.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(r"^(mon|tue|wed|thu|fri|sat|sun)$"))))]
    pub days: Vec<String>,
    /// `HH:MM-HH:MM` ranges, UTC, end exclusive; may cross midnight. Empty = all day.
    #[serde(default)]
    pub hours: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Bit i set = day i allowed (0 = Sunday).
    days: u8,
    /// Minute-of-day ranges `[start, end)`; start > end crosses midnight.
    ranges: Vec<(u32, u32)>,
}

/// Day of week for a Unix time, 0 = Sunday (1970-01-01 was a Thursday).
pub fn weekday(t: u64) -> usize {
    ((t / DAY + 4) % 7) as usize
}

fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: u32 = h.parse().ok()?;
    let m: u32 = m.parse().ok()?;
    if h > 24 || m > 59 || (h == 24 && m != 0) {
        return None;
    }
    Some(h * 60 + m)
}

impl Window {
    pub fn compile(c: &WindowConfig) -> Result<Window, String> {
        let mut days = 0u8;
        for d in &c.days {
            let i = DAY_NAMES.iter().position(|n| n == d).ok_or_else(|| format!("unknown day `{d}` (use mon..sun)"))?;
            days |= 1 << i;
        }
        if c.days.is_empty() {
            days = 0x7f;
        }
        let mut ranges = Vec::new();
        for r in &c.hours {
            let (a, b) = r.split_once('-').ok_or_else(|| format!("bad hour range `{r}` (use HH:MM-HH:MM)"))?;
            let (a, b) = (
                parse_hhmm(a).ok_or_else(|| format!("bad time `{a}` in `{r}`"))?,
                parse_hhmm(b).ok_or_else(|| format!("bad time `{b}` in `{r}`"))?,
            );
            if a == b {
                return Err(format!("empty hour range `{r}`"));
            }
            ranges.push((a, b));
        }
        Ok(Window { days, ranges })
    }

    pub fn contains(&self, t: u64) -> bool {
        if self.days & (1 << weekday(t)) == 0 {
            return false;
        }
        if self.ranges.is_empty() {
            return true;
        }
        let minute = ((t % DAY) / 60) as u32;
        self.ranges.iter().any(|&(a, b)| if a < b { minute >= a && minute < b } else { minute >= a || minute < b })
    }

    /// The first instant after `t` at which `contains` may change.
    pub fn next_boundary(&self, t: u64) -> u64 {
        let day_start = t - t % DAY;
        let mut best = day_start + DAY; // midnight: day-of-week changes
        for &(a, b) in &self.ranges {
            for m in [a, b] {
                for base in [day_start, day_start + DAY] {
                    let at = base + u64::from(m) * 60;
                    if at > t && at < best {
                        best = at;
                    }
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-25 is a Wednesday.
    const WED_0000: u64 = 1_795_564_800;

    fn w(days: &[&str], hours: &[&str]) -> Window {
        Window::compile(&WindowConfig {
            days: days.iter().map(|s| s.to_string()).collect(),
            hours: hours.iter().map(|s| s.to_string()).collect(),
        })
        .unwrap()
    }

    #[test]
    fn weekday_is_right() {
        assert_eq!(weekday(WED_0000), 3);
        assert_eq!(weekday(0), 4);
    }

    #[test]
    fn business_hours() {
        let win = w(&["mon", "tue", "wed", "thu", "fri"], &["08:00-20:00"]);
        assert!(!win.contains(WED_0000 + 7 * 3600 + 59 * 60 + 59));
        assert!(win.contains(WED_0000 + 8 * 3600));
        assert!(win.contains(WED_0000 + 19 * 3600 + 59 * 60 + 59));
        assert!(!win.contains(WED_0000 + 20 * 3600));
        assert!(!win.contains(WED_0000 + 3 * 86_400 + 10 * 3600), "saturday");
    }

    #[test]
    fn boundary_of_an_allow_at_1959() {
        let win = w(&[], &["08:00-20:00"]);
        let t = WED_0000 + 19 * 3600 + 59 * 60 + 59;
        assert_eq!(win.next_boundary(t), WED_0000 + 20 * 3600);
        assert_eq!(win.next_boundary(WED_0000 + 21 * 3600), WED_0000 + 86_400);
        assert_eq!(win.next_boundary(WED_0000 + 3600), WED_0000 + 8 * 3600);
    }

    #[test]
    fn window_crossing_midnight() {
        let win = w(&[], &["22:00-06:00"]);
        assert!(win.contains(WED_0000 + 23 * 3600));
        assert!(win.contains(WED_0000 + 5 * 3600));
        assert!(!win.contains(WED_0000 + 12 * 3600));
        assert_eq!(win.next_boundary(WED_0000 + 23 * 3600), WED_0000 + 86_400);
        assert_eq!(win.next_boundary(WED_0000 + 86_400), WED_0000 + 86_400 + 6 * 3600);
    }

    #[test]
    fn bad_windows_refused() {
        for (d, h) in [(vec!["funday"], vec![]), (vec![], vec!["8-20"]), (vec![], vec!["08:00-08:00"]), (vec![], vec!["25:00-26:00"])] {
            let c = WindowConfig { days: d.into_iter().map(String::from).collect(), hours: h.into_iter().map(String::from).collect() };
            assert!(Window::compile(&c).is_err());
        }
    }
}

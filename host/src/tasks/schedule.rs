//! When a task fires: a cron pattern (seconds optional) in an IANA time
//! zone, a fixed interval, a single moment, or never by itself (manual).
//!
//! Times are wall-clock milliseconds since the Unix epoch, the unit the
//! store keeps, so a schedule means the same after a restart. Daylight
//! saving follows cron's usual rule (the one croner implements): a fixed
//! time that a spring-forward skips fires at the first valid time after the
//! gap; a time that a fall-back repeats fires once, at its first occurrence;
//! patterns that fire every second/minute/hour follow the real clock.

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use croner::Cron;
use croner::parser::{CronParser, Seconds};
use serde::{Deserialize, Serialize};

/// A schedule as written in a task (JSON or TOML); absent means manual.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum ScheduleSpec {
    /// `{"cron": "*/10 * * * * *", "tz": "Europe/Berlin"}`; `tz` defaults to UTC.
    Cron {
        cron: String,
        #[serde(default = "utc", skip_serializing_if = "is_utc")]
        tz: String,
    },
    /// `{"every_ms": 1000}`: every interval, counted from when the task was
    /// defined (or last changed).
    Every { every_ms: u64 },
    /// `{"at": "2026-12-24T18:00:00+01:00"}`: once (RFC 3339).
    At { at: String },
}

fn utc() -> String {
    "UTC".to_owned()
}

fn is_utc(tz: &String) -> bool {
    tz == "UTC"
}

/// Why a schedule was refused; `field` names what to fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ScheduleError {
    pub field: &'static str,
    pub reason: String,
}

fn refuse(field: &'static str, reason: impl Into<String>) -> ScheduleError {
    ScheduleError {
        field,
        reason: reason.into(),
    }
}

/// Parses `pattern`, sharing one parsed copy among the tasks that use it:
/// croner keeps a year table of about 5 KiB in every parsed pattern, which
/// would otherwise be most of what a task costs in memory.
fn interned(pattern: &str) -> Result<Arc<Cron>, ScheduleError> {
    static PARSED: Mutex<Option<HashMap<String, Weak<Cron>>>> = Mutex::new(None);
    let mut parsed = PARSED.lock().unwrap_or_else(|e| e.into_inner());
    let parsed = parsed.get_or_insert_with(HashMap::new);
    if let Some(cron) = parsed.get(pattern).and_then(Weak::upgrade) {
        return Ok(cron);
    }
    let cron = Arc::new(
        CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(pattern)
            .map_err(|e| refuse("schedule.cron", format!("{pattern:?}: {e}")))?,
    );
    // Forget patterns no task uses any more, now and then.
    if parsed.len() >= 1_024 && parsed.len().is_power_of_two() {
        parsed.retain(|_, cron| cron.strong_count() > 0);
    }
    parsed.insert(pattern.to_owned(), Arc::downgrade(&cron));
    Ok(cron)
}

/// The shortest interval: a task that fires more often is a busy loop.
pub const MIN_EVERY_MS: u64 = 100;

/// A checked schedule, ready to say when it fires next.
#[derive(Debug, Clone)]
pub enum Schedule {
    Cron { cron: Arc<Cron>, tz: Tz },
    Every { every_ms: i64 },
    At { at_ms: i64 },
    Manual,
}

impl Schedule {
    /// Checks `spec` (`None`: manual only).
    pub fn parse(spec: Option<&ScheduleSpec>) -> Result<Self, ScheduleError> {
        let Some(spec) = spec else {
            return Ok(Schedule::Manual);
        };
        match spec {
            ScheduleSpec::Cron { cron, tz } => {
                let tz = Tz::from_str(tz).map_err(|_| {
                    refuse(
                        "schedule.tz",
                        format!(
                            "{tz:?} is not an IANA time zone (e.g. \"Europe/Berlin\", \"UTC\")"
                        ),
                    )
                })?;
                let parsed = interned(cron)?;
                Ok(Schedule::Cron { cron: parsed, tz })
            }
            ScheduleSpec::Every { every_ms } => {
                if *every_ms < MIN_EVERY_MS {
                    return Err(refuse(
                        "schedule.every_ms",
                        format!("must be at least {MIN_EVERY_MS}"),
                    ));
                }
                Ok(Schedule::Every {
                    every_ms: *every_ms as i64,
                })
            }
            ScheduleSpec::At { at } => {
                let moment = DateTime::parse_from_rfc3339(at).map_err(|e| {
                    refuse(
                        "schedule.at",
                        format!("{at:?} is not an RFC 3339 time: {e}"),
                    )
                })?;
                Ok(Schedule::At {
                    at_ms: moment.timestamp_millis(),
                })
            }
        }
    }

    /// The first firing strictly after `after_ms`; `None` when it never
    /// fires again. `anchor_ms` is where an interval counts from.
    pub fn next_after(&self, after_ms: i64, anchor_ms: i64) -> Option<i64> {
        match self {
            Schedule::Manual => None,
            Schedule::At { at_ms } => (*at_ms > after_ms).then_some(*at_ms),
            Schedule::Every { every_ms } => {
                if after_ms < anchor_ms {
                    return Some(anchor_ms + every_ms);
                }
                let periods = (after_ms - anchor_ms) / every_ms + 1;
                Some(anchor_ms + periods * every_ms)
            }
            Schedule::Cron { cron, tz } => {
                let after = Utc
                    .timestamp_millis_opt(after_ms)
                    .single()?
                    .with_timezone(tz);
                cron.find_next_occurrence(&after, false)
                    .ok()
                    .map(|next| next.timestamp_millis())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_with_one_pattern_share_its_parsed_form() {
        let parse = |cron: &str| match Schedule::parse(Some(&ScheduleSpec::Cron {
            cron: cron.into(),
            tz: "UTC".into(),
        }))
        .unwrap()
        {
            Schedule::Cron { cron, .. } => cron,
            other => panic!("{other:?}"),
        };
        let (a, b, c) = (
            parse("0 5 * * * *"),
            parse("0 5 * * * *"),
            parse("0 6 * * * *"),
        );
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
    }

    fn ms(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis()
    }

    fn cron(pattern: &str, tz: &str) -> Schedule {
        Schedule::parse(Some(&ScheduleSpec::Cron {
            cron: pattern.into(),
            tz: tz.into(),
        }))
        .unwrap()
    }

    /// The next `count` firings after `from`, as RFC 3339 in UTC.
    fn firings(schedule: &Schedule, from: &str, count: usize) -> Vec<String> {
        let mut at = ms(from);
        (0..count)
            .map(|_| {
                at = schedule.next_after(at, ms(from)).unwrap();
                Utc.timestamp_millis_opt(at)
                    .unwrap()
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            })
            .collect()
    }

    #[test]
    fn cron_with_seconds_fires_on_the_pattern() {
        let every_ten = cron("*/10 * * * * *", "UTC");
        assert_eq!(
            firings(&every_ten, "2026-12-03T10:00:03Z", 3),
            [
                "2026-12-03T10:00:10Z",
                "2026-12-03T10:00:20Z",
                "2026-12-03T10:00:30Z"
            ]
        );
        // Five fields: minutes, at second 0.
        let hourly = cron("15 * * * *", "UTC");
        assert_eq!(
            firings(&hourly, "2026-12-03T10:15:00Z", 2),
            ["2026-12-03T11:15:00Z", "2026-12-03T12:15:00Z"]
        );
    }

    #[test]
    fn a_time_zone_with_daylight_saving_is_followed() {
        // 09:00 in Berlin is 08:00 UTC in winter (CET, UTC+1) and 07:00 UTC
        // in summer (CEST, UTC+2); clocks go forward on 2026-03-29.
        let nine = cron("0 0 9 * * *", "Europe/Berlin");
        assert_eq!(
            firings(&nine, "2026-03-27T12:00:00Z", 3),
            [
                "2026-03-28T08:00:00Z",
                "2026-03-29T07:00:00Z",
                "2026-03-30T07:00:00Z"
            ]
        );
        // 02:30 does not exist on 2026-03-29 in Berlin (02:00 -> 03:00): it
        // fires at the first valid time after the gap, 03:00 CEST.
        let half_past_two = cron("0 30 2 * * *", "Europe/Berlin");
        assert_eq!(
            firings(&half_past_two, "2026-03-28T12:00:00Z", 2),
            ["2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]
        );
        // 02:30 happens twice on 2026-10-25 (03:00 CEST -> 02:00 CET): once.
        assert_eq!(
            firings(&half_past_two, "2026-10-24T12:00:00Z", 2),
            ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]
        );
    }

    #[test]
    fn intervals_count_from_their_anchor_and_one_shots_fire_once() {
        let every = Schedule::parse(Some(&ScheduleSpec::Every { every_ms: 1_000 })).unwrap();
        assert_eq!(every.next_after(10_500, 10_000), Some(11_000));
        assert_eq!(every.next_after(11_000, 10_000), Some(12_000));
        assert_eq!(every.next_after(9_000, 10_000), Some(11_000));
        let once = Schedule::parse(Some(&ScheduleSpec::At {
            at: "2026-12-24T18:00:00+01:00".into(),
        }))
        .unwrap();
        let at = ms("2026-12-24T17:00:00Z");
        assert_eq!(once.next_after(at - 1, 0), Some(at));
        assert_eq!(once.next_after(at, 0), None);
        assert_eq!(Schedule::parse(None).unwrap().next_after(0, 0), None);
    }

    #[test]
    fn bad_schedules_name_the_field() {
        let refused = |spec: ScheduleSpec| Schedule::parse(Some(&spec)).unwrap_err().field;
        assert_eq!(
            refused(ScheduleSpec::Cron {
                cron: "61 * * * *".into(),
                tz: "UTC".into()
            }),
            "schedule.cron"
        );
        assert_eq!(
            refused(ScheduleSpec::Cron {
                cron: "* * * * *".into(),
                tz: "Mars/Olympus".into()
            }),
            "schedule.tz"
        );
        assert_eq!(
            refused(ScheduleSpec::Every { every_ms: 5 }),
            "schedule.every_ms"
        );
        assert_eq!(
            refused(ScheduleSpec::At {
                at: "tomorrow".into()
            }),
            "schedule.at"
        );
    }

    #[test]
    fn schedules_read_as_the_issue_writes_them() {
        let parse = |json: &str| serde_json::from_str::<ScheduleSpec>(json).unwrap();
        assert_eq!(
            parse(r#"{"cron":"*/10 * * * * *","tz":"UTC"}"#),
            ScheduleSpec::Cron {
                cron: "*/10 * * * * *".into(),
                tz: "UTC".into()
            }
        );
        assert_eq!(
            parse(r#"{"every_ms":1000}"#),
            ScheduleSpec::Every { every_ms: 1000 }
        );
        assert!(matches!(
            parse(r#"{"at":"2026-01-01T00:00:00Z"}"#),
            ScheduleSpec::At { .. }
        ));
    }
}

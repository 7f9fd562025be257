//! RFC 9110 byte ranges for downloads: which part of a file a `GET`
//! answers with, given `Range` and `If-Range`. One range per request; a
//! request for several, or one the server cannot read, is answered whole
//! (which RFC 9110 allows).

use http::{HeaderMap, header};

/// What a download sends.
#[derive(Debug, PartialEq, Eq)]
pub enum Part {
    /// The whole file (200).
    Whole,
    /// Bytes `start..=end` (206).
    Range { start: u64, end: u64 },
    /// Nothing of the file can be sent (416).
    Unsatisfiable,
}

/// The part of a file of `length` bytes with strong entity tag `etag`
/// that the request's headers ask for.
pub fn requested(headers: &HeaderMap, length: u64, etag: &str) -> Part {
    let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Part::Whole;
    };
    // A Range made for another version of the file does not apply to this
    // one: send it all. (A date here is never a strong validator.)
    if let Some(if_range) = headers.get(header::IF_RANGE)
        && if_range.as_bytes() != etag.as_bytes()
    {
        return Part::Whole;
    }
    let Some(spec) = range
        .trim()
        .split_once('=')
        .filter(|(unit, _)| unit.trim().eq_ignore_ascii_case("bytes"))
        .map(|(_, spec)| spec.trim())
    else {
        return Part::Whole;
    };
    if spec.contains(',') {
        return Part::Whole;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Part::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    let parse = |s: &str| {
        s.parse::<u64>()
            .ok()
            .filter(|_| s.bytes().all(|b| b.is_ascii_digit()))
    };
    match (first.is_empty(), last.is_empty()) {
        // `-n`: the last n bytes.
        (true, false) => match parse(last) {
            None => Part::Whole,
            Some(0) => Part::Unsatisfiable,
            Some(_) if length == 0 => Part::Unsatisfiable,
            Some(n) => Part::Range {
                start: length.saturating_sub(n),
                end: length - 1,
            },
        },
        // `a-` or `a-b`.
        (false, _) => {
            let Some(start) = parse(first) else {
                return Part::Whole;
            };
            let end = if last.is_empty() {
                u64::MAX
            } else {
                match parse(last) {
                    Some(end) if end >= start => end,
                    _ => return Part::Whole,
                }
            };
            if start >= length {
                Part::Unsatisfiable
            } else {
                Part::Range {
                    start,
                    end: end.min(length - 1),
                }
            }
        }
        (true, true) => Part::Whole,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const TAG: &str = "\"abc\"";

    fn ask(range: &str, if_range: Option<&str>, length: u64) -> Part {
        let mut headers = HeaderMap::new();
        headers.insert(header::RANGE, HeaderValue::from_str(range).unwrap());
        if let Some(tag) = if_range {
            headers.insert(header::IF_RANGE, HeaderValue::from_str(tag).unwrap());
        }
        requested(&headers, length, TAG)
    }

    #[test]
    fn ranges_as_rfc_9110_reads_them() {
        let range = |start, end| Part::Range { start, end };
        assert_eq!(ask("bytes=0-99", None, 1000), range(0, 99));
        assert_eq!(ask("bytes=900-", None, 1000), range(900, 999));
        assert_eq!(ask("bytes=900-5000", None, 1000), range(900, 999));
        assert_eq!(ask("bytes=-100", None, 1000), range(900, 999));
        assert_eq!(ask("bytes=-5000", None, 1000), range(0, 999));
        assert_eq!(ask("Bytes = 5-5", None, 1000), range(5, 5));
        assert_eq!(ask("bytes=1000-", None, 1000), Part::Unsatisfiable);
        assert_eq!(ask("bytes=-0", None, 1000), Part::Unsatisfiable);
        assert_eq!(ask("bytes=0-", None, 0), Part::Unsatisfiable);
        // Unreadable, several, or another unit: the whole file.
        assert_eq!(ask("bytes=9-1", None, 1000), Part::Whole);
        assert_eq!(ask("bytes=0-1,5-6", None, 1000), Part::Whole);
        assert_eq!(ask("items=0-1", None, 1000), Part::Whole);
        assert_eq!(ask("bytes=+1-2", None, 1000), Part::Whole);
        // If-Range: only the same strong tag keeps the range.
        assert_eq!(ask("bytes=0-9", Some(TAG), 1000), range(0, 9));
        assert_eq!(ask("bytes=0-9", Some("\"other\""), 1000), Part::Whole);
        assert_eq!(
            ask("bytes=0-9", Some("Wed, 21 Oct 2015 07:28:00 GMT"), 1000),
            Part::Whole
        );
        assert_eq!(requested(&HeaderMap::new(), 10, TAG), Part::Whole);
    }
}

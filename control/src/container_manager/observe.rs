//! Reads what the instances reported to the scoreboard (docs/SCOREBOARD.md)
//! in one pipelined round trip, and reduces it to the policy's inputs.

use crate::scoreboard::{load_key, seen_key};

/// One instance's last report.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Instance id.
    pub id: String,
    /// Last reported load, 0–100.
    pub load: Option<f64>,
    /// Last report time, Unix ms.
    pub seen_ms: Option<i64>,
}

/// `ZMSCORE load` and `ZMSCORE seen` for `ids`, pipelined.
pub async fn read_reports<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    service: &str,
    ids: &[String],
) -> redis::RedisResult<Vec<Report>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let (loads, seens): (Vec<Option<f64>>, Vec<Option<f64>>) = redis::pipe()
        .cmd("ZMSCORE")
        .arg(load_key(service))
        .arg(ids)
        .cmd("ZMSCORE")
        .arg(seen_key(service))
        .arg(ids)
        .query_async(conn)
        .await?;
    Ok(ids
        .iter()
        .enumerate()
        .map(|(i, id)| Report {
            id: id.clone(),
            load: loads.get(i).copied().flatten(),
            seen_ms: seens.get(i).copied().flatten().map(|s| s as i64),
        })
        .collect())
}

/// Fresh reports (seen within `stale_ms` of `now_ms`, with a load) and the
/// mean of their loads.
pub fn fresh_mean(reports: &[Report], now_ms: i64, stale_ms: i64) -> (u32, Option<f64>) {
    let fresh: Vec<f64> = reports
        .iter()
        .filter(|r| r.seen_ms.is_some_and(|s| now_ms - s <= stale_ms))
        .filter_map(|r| r.load)
        .map(|l| l.clamp(0.0, 100.0))
        .collect();
    if fresh.is_empty() {
        return (0, None);
    }
    let n = fresh.len() as u32;
    (n, Some(fresh.iter().sum::<f64>() / f64::from(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: &str, load: Option<f64>, seen: Option<i64>) -> Report {
        Report {
            id: id.into(),
            load,
            seen_ms: seen,
        }
    }

    #[test]
    fn stale_and_missing_reports_do_not_count() {
        let reps = [
            r("a", Some(40.0), Some(10_000)),
            r("b", Some(80.0), Some(9_500)),
            r("c", Some(99.0), Some(1_000)),
            r("d", None, None),
        ];
        assert_eq!(fresh_mean(&reps, 10_000, 1_000), (2, Some(60.0)));
        assert_eq!(fresh_mean(&reps[3..], 10_000, 1_000), (0, None));
    }
}

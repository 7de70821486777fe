//! The migration v2 state machine (SPEC 4): the direct arcs and the shortest path to any
//! other state, with no saving state (PRE_COPY, STOP_COPY) inside it.

use crate::error::{LogError, LogResult};
use crate::uapi::DeviceState;

/// The direct arcs out of `state` (P2P states are not offered).
pub fn direct_arcs(state: DeviceState) -> &'static [DeviceState] {
    use DeviceState::*;
    match state {
        Running => &[Stop, PreCopy],
        Stop => &[Running, StopCopy, Resuming],
        StopCopy => &[Stop],
        Resuming => &[Stop],
        PreCopy => &[Running, StopCopy],
        _ => &[],
    }
}

/// Whether `state` produces migration data.
pub fn is_saving(state: DeviceState) -> bool {
    matches!(
        state,
        DeviceState::PreCopy | DeviceState::StopCopy | DeviceState::PreCopyP2p
    )
}

/// The states from `from` to `to`, both included (`[from]` when equal), along the shortest
/// path of direct arcs with no saving state in its interior. STOP_COPY to PRE_COPY, ERROR
/// as either end, P2P states and unreachable targets are EINVAL.
pub fn migration_path(from: DeviceState, to: DeviceState) -> LogResult<Vec<DeviceState>> {
    if from == to {
        return Ok(vec![from]);
    }
    if from == DeviceState::Error || to == DeviceState::Error {
        return Err(LogError::Invalid("ERROR is left only by a reset"));
    }
    if from == DeviceState::StopCopy && to == DeviceState::PreCopy {
        return Err(LogError::Invalid("STOP_COPY cannot go back to PRE_COPY"));
    }
    // Breadth-first search over at most 8 states.
    let mut previous: [Option<DeviceState>; 8] = [None; 8];
    let mut queue = std::collections::VecDeque::from([from]);
    let mut seen = [false; 8];
    seen[from as usize] = true;
    while let Some(at) = queue.pop_front() {
        if at == to {
            let mut path = vec![to];
            let mut cursor = to;
            while let Some(before) = previous[cursor as usize] {
                path.push(before);
                cursor = before;
            }
            path.reverse();
            return Ok(path);
        }
        if at != from && is_saving(at) {
            continue;
        }
        for &next in direct_arcs(at) {
            if !seen[next as usize] {
                seen[next as usize] = true;
                previous[next as usize] = Some(at);
                queue.push_back(next);
            }
        }
    }
    Err(LogError::Invalid("no path to the requested state"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeviceState::*;

    #[test]
    fn shortest_paths_avoid_saving_states() {
        assert_eq!(
            migration_path(Running, StopCopy).unwrap(),
            vec![Running, Stop, StopCopy]
        );
        assert_eq!(
            migration_path(PreCopy, Stop).unwrap(),
            vec![PreCopy, Running, Stop]
        );
        assert_eq!(
            migration_path(StopCopy, Running).unwrap(),
            vec![StopCopy, Stop, Running]
        );
        assert_eq!(
            migration_path(Resuming, PreCopy).unwrap(),
            vec![Resuming, Stop, Running, PreCopy]
        );
        assert_eq!(
            migration_path(PreCopy, StopCopy).unwrap(),
            vec![PreCopy, StopCopy]
        );
        assert_eq!(migration_path(Stop, Stop).unwrap(), vec![Stop]);
        assert!(migration_path(StopCopy, PreCopy).is_err());
        assert!(migration_path(Running, RunningP2p).is_err());
        assert!(migration_path(Error, Stop).is_err());
        // Every pair among the five supported states: a path exists except STOP_COPY ->
        // PRE_COPY, uses only direct arcs, and has no saving state inside.
        let states = [Running, Stop, StopCopy, Resuming, PreCopy];
        for from in states {
            for to in states {
                let Ok(path) = migration_path(from, to) else {
                    assert_eq!((from, to), (StopCopy, PreCopy));
                    continue;
                };
                for pair in path.windows(2) {
                    assert!(direct_arcs(pair[0]).contains(&pair[1]));
                }
                for inner in path.iter().skip(1).take(path.len().saturating_sub(2)) {
                    assert!(!is_saving(*inner), "{from:?} -> {to:?}: {path:?}");
                }
            }
        }
    }
}

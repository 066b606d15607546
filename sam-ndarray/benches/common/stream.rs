//! The size of the STREAM arrays the benchmarks measure the machine's bandwidth with (shared
//! with sam-candle's bench).

/// Size of the last-level cache in bytes (from sysfs; 32 MiB if unknown).
pub fn llc_bytes() -> usize {
    (0..8)
        .rev()
        .find_map(|i| {
            let s = std::fs::read_to_string(format!(
                "/sys/devices/system/cpu/cpu0/cache/index{i}/size"
            ))
            .ok()?;
            let s = s.trim();
            let (num, mul) = match s.strip_suffix('K') {
                Some(n) => (n, 1024),
                None => match s.strip_suffix('M') {
                    Some(n) => (n, 1024 * 1024),
                    None => (s, 1),
                },
            };
            num.parse::<usize>().ok().map(|n| n * mul)
        })
        .unwrap_or(32 << 20)
}

/// Elements of each f32 triad array: each array spans at least 4× the last-level cache (and
/// 64 MiB), so the triad runs from memory.
pub fn stream_len() -> usize {
    (4 * llc_bytes() / 4).max(1 << 24)
}

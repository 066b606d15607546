//! Loading, checking, splitting and scaling the data.

use std::io::Read;
use std::path::{Path, PathBuf};

use ndarray::{Array2, Axis};
use sha2::{Digest, Sha256};

use crate::rng::Rng;

/// sha256 of `sam-ndarray/data/digits.csv.gz` (the copy described in `data/README.md`).
pub const DIGITS_SHA256: &str = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22";

/// Most classes a file may have (the labels are `0..K`); guards against a bogus label making a
/// huge output layer.
const MAX_CLASSES: usize = 1000;

/// A labelled data set: one row of features per sample.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Features, `n × d`.
    pub x: Array2<f64>,
    /// Labels in `0..classes`.
    pub y: Vec<usize>,
    /// Number of classes (largest label + 1).
    pub classes: usize,
    /// Where it came from, for messages and `results.json`.
    pub source: String,
    /// The known range of every feature (`Some((0, 16))` for the digits), else `None`: the
    /// features are then min–max scaled with the training split's statistics.
    pub known_range: Option<(f64, f64)>,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// The samples at `idx`, in that order.
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        Dataset {
            x: self.x.select(Axis(0), idx),
            y: idx.iter().map(|&i| self.y[i]).collect(),
            classes: self.classes,
            source: self.source.clone(),
            known_range: self.known_range,
        }
    }
}

/// The bundled data file, located from the crate's manifest directory at compile time. This
/// module is shared with sam-candle's `digits_cnn` example, which finds the file in its sibling
/// crate `sam-ndarray`.
pub fn bundled_path() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let crate_dir = if env!("CARGO_PKG_NAME") == "sam-ndarray" {
        manifest.to_path_buf()
    } else {
        manifest.join("..").join("sam-ndarray")
    };
    crate_dir.join("data").join("digits.csv.gz")
}

/// The bundled UCI digits (checked against [`DIGITS_SHA256`]).
pub fn load_bundled() -> Result<Dataset, String> {
    let path = bundled_path();
    let bytes = std::fs::read(&path).map_err(|e| {
        format!(
            "cannot read the bundled data set {}: {e}\n(run the demo from a checkout with \
             `cargo run --release -p sam-ndarray --example digits`, or pass --data FILE)",
            path.display()
        )
    })?;
    let digest = Sha256::digest(&bytes);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    if hex != DIGITS_SHA256 {
        return Err(format!(
            "checksum mismatch for {}:\n  expected sha256 {DIGITS_SHA256}\n  found    sha256 {hex}\n\
             the file is corrupt or was replaced; restore it from git (`git checkout -- {}`)",
            path.display(),
            "sam-ndarray/data/digits.csv.gz"
        ));
    }
    let mut ds = parse(&bytes, &path.display().to_string(), false)?;
    if ds.x.ncols() != 64 || ds.classes != 10 || ds.len() != 1797 {
        return Err(format!(
            "{}: expected 1797 rows of 64 features and labels 0..9, found {} rows of {} features and {} classes",
            path.display(),
            ds.len(),
            ds.x.ncols(),
            ds.classes
        ));
    }
    ds.source = "UCI optical recognition of handwritten digits (bundled, 1797 samples)".into();
    ds.known_range = Some((0.0, 16.0));
    Ok(ds)
}

/// A user's CSV file (gzip or plain): numeric features, integer class label last.
pub fn load_file(path: &Path, skip_header: bool) -> Result<Dataset, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(&bytes, &path.display().to_string(), skip_header)
}

/// Parses CSV bytes (gunzipping them first if they start with the gzip magic number).
pub fn parse(bytes: &[u8], name: &str, skip_header: bool) -> Result<Dataset, String> {
    let text = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| format!("{name}: not a valid gzip file: {e}"))?;
        out
    } else {
        bytes.to_vec()
    };
    let text = String::from_utf8(text).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        format!("{name}: line {line}: not UTF-8 text (is this a CSV file?)")
    })?;

    let mut features: Vec<f64> = Vec::new();
    let mut labels: Vec<usize> = Vec::new();
    let mut width: Option<(usize, usize)> = None; // (columns, line first seen)
    let mut header_skipped = !skip_header;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !header_skipped {
            header_skipped = true;
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let cols = fields.len();
        match width {
            None => {
                if cols < 2 {
                    return Err(format!(
                        "{name}: line {line_no}: found {cols} column; expected at least one feature \
                         and the class label last, separated by commas"
                    ));
                }
                width = Some((cols, line_no));
            }
            Some((w, first)) if w != cols => {
                return Err(format!(
                    "{name}: line {line_no}: found {cols} columns, expected {w} (as on line {first})"
                ));
            }
            Some(_) => {}
        }
        for (c, f) in fields[..cols - 1].iter().enumerate() {
            match f.parse::<f64>() {
                Ok(v) if v.is_finite() => features.push(v),
                _ => {
                    let hint = if labels.is_empty() && !skip_header {
                        " (if the file has a header line, pass --skip-header)"
                    } else {
                        ""
                    };
                    return Err(format!(
                        "{name}: line {line_no}, column {}: expected a finite number, found {f:?}{hint}",
                        c + 1
                    ));
                }
            }
        }
        let lab = fields[cols - 1];
        let label = lab.parse::<u64>().ok().or_else(|| {
            lab.parse::<f64>()
                .ok()
                .filter(|v| *v >= 0.0 && v.fract() == 0.0 && *v < 1e9)
                .map(|v| v as u64)
        });
        match label {
            Some(l) if (l as usize) < MAX_CLASSES => labels.push(l as usize),
            Some(l) => {
                return Err(format!(
                    "{name}: line {line_no}, column {cols} (the label): class {l} is too large; \
                     labels must be 0..K-1 with K <= {MAX_CLASSES}"
                ));
            }
            None => {
                return Err(format!(
                    "{name}: line {line_no}, column {cols} (the label): expected a non-negative integer \
                     class label, found {lab:?}"
                ));
            }
        }
    }
    let Some((cols, _)) = width else {
        return Err(format!("{name}: no data rows found"));
    };
    let n = labels.len();
    let classes = labels.iter().copied().max().unwrap_or(0) + 1;
    if classes < 2 {
        return Err(format!(
            "{name}: every row has label 0; a classifier needs at least two classes"
        ));
    }
    if n < 20 {
        return Err(format!(
            "{name}: only {n} rows; the demo needs at least 20 to split train and test"
        ));
    }
    let x = Array2::from_shape_vec((n, cols - 1), features)
        .map_err(|e| format!("{name}: internal error shaping the features: {e}"))?;
    Ok(Dataset {
        x,
        y: labels,
        classes,
        source: name.to_string(),
        known_range: None,
    })
}

/// A stratified split of `0..y.len()`: from each class, `round(n_c · fraction)` samples (at
/// most `n_c − 1`, so every class keeps one) go to the second part. Both parts sorted.
pub fn stratified_split(
    y: &[usize],
    classes: usize,
    fraction: f64,
    rng: &mut Rng,
) -> (Vec<usize>, Vec<usize>) {
    let mut by_class = vec![Vec::new(); classes];
    for (i, &c) in y.iter().enumerate() {
        by_class[c].push(i);
    }
    let (mut keep, mut take) = (Vec::new(), Vec::new());
    for mut idx in by_class {
        rng.shuffle(&mut idx);
        let k = ((idx.len() as f64 * fraction).round() as usize).min(idx.len().saturating_sub(1));
        take.extend_from_slice(&idx[..k]);
        keep.extend_from_slice(&idx[k..]);
    }
    keep.sort_unstable();
    take.sort_unstable();
    (keep, take)
}

/// Flips `round(fraction · n)` labels, chosen at random, each to a different class chosen
/// uniformly among the others. Returns the number flipped.
pub fn flip_labels(y: &mut [usize], classes: usize, fraction: f64, rng: &mut Rng) -> usize {
    let n = ((y.len() as f64) * fraction).round() as usize;
    let mut idx: Vec<usize> = (0..y.len()).collect();
    rng.shuffle(&mut idx);
    for &i in &idx[..n.min(y.len())] {
        y[i] = (y[i] + 1 + rng.below(classes - 1)) % classes;
    }
    n.min(y.len())
}

/// Scales every feature to `[0, 1]`: by the known range, or by the min and max of `fit`
/// (constant features become 0; other sets are scaled with `fit`'s statistics, not clipped).
pub fn scale(fit: &mut Dataset, others: &mut [&mut Dataset]) {
    let d = fit.x.ncols();
    let (lo, span): (Vec<f64>, Vec<f64>) = match fit.known_range {
        Some((a, b)) => (vec![a; d], vec![b - a; d]),
        None => fit
            .x
            .axis_iter(Axis(1))
            .map(|col| {
                let lo = col.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = col.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                (lo, hi - lo)
            })
            .unzip(),
    };
    let apply = |x: &mut Array2<f64>| {
        for mut row in x.rows_mut() {
            for ((v, &l), &s) in row.iter_mut().zip(&lo).zip(&span) {
                *v = if s > 0.0 { (*v - l) / s } else { 0.0 };
            }
        }
    };
    apply(&mut fit.x);
    for o in others {
        apply(&mut o.x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(text.as_bytes(), "f.csv", false).unwrap_err()
    }

    fn rows(n: usize) -> String {
        (0..n)
            .map(|i| format!("{i},{}.5,{}\n", i * 2, i % 3))
            .collect()
    }

    #[test]
    fn parses_plain_and_gzip() {
        use std::io::Write;
        let text = format!("# comment\n\n{}", rows(30).replace('\n', "\r\n"));
        let plain = parse(text.as_bytes(), "f.csv", false).unwrap();
        assert_eq!((plain.len(), plain.x.ncols(), plain.classes), (30, 2, 3));
        assert_eq!(plain.x[[3, 1]], 6.5);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(text.as_bytes()).unwrap();
        let zipped = parse(&gz.finish().unwrap(), "f.csv.gz", false).unwrap();
        assert_eq!((zipped.x, zipped.y), (plain.x, plain.y));
        let with_header = format!("a,b,label\n{}", rows(30));
        assert!(parse(with_header.as_bytes(), "f", true).is_ok());
    }

    #[test]
    fn errors_name_the_line_and_column() {
        assert!(err(&format!("{}1,zz,0\n", rows(2))).contains("line 3, column 2"));
        assert!(err(&format!("{}1,0\n", rows(2))).contains("line 3: found 2 columns, expected 3"));
        assert!(err(&format!("{}1,2,x\n", rows(2))).contains("line 3, column 3 (the label)"));
        assert!(err(&format!("{}1,2,2.5\n", rows(2))).contains("line 3, column 3"));
        assert!(err("a,b,c\n").contains("--skip-header"));
        assert!(err("").contains("no data rows"));
        assert!(err(&rows(5)).contains("at least 20"));
        assert!(
            parse(&[0x1f, 0x8b, 0, 1, 2], "f.gz", false)
                .unwrap_err()
                .contains("gzip")
        );
        assert!(
            parse(&[b'1', b',', 0xff], "f", false)
                .unwrap_err()
                .contains("UTF-8")
        );
    }

    #[test]
    fn stratified_split_and_label_flips() {
        let y: Vec<usize> = (0..100).map(|i| i % 4).collect();
        let (keep, take) = stratified_split(&y, 4, 0.3, &mut Rng::new("t", 0));
        // 25 per class: round(7.5) = 8 of each class held out.
        assert_eq!((keep.len(), take.len()), (68, 32));
        for c in 0..4 {
            assert_eq!(take.iter().filter(|&&i| y[i] == c).count(), 8);
        }
        let mut noisy = y.clone();
        let n = flip_labels(&mut noisy, 4, 0.4, &mut Rng::new("t", 1));
        assert_eq!(n, 40);
        assert_eq!(noisy.iter().zip(&y).filter(|(a, b)| a != b).count(), 40);
        assert!(noisy.iter().all(|&c| c < 4));
    }

    #[test]
    fn bundled_file_loads_and_matches_its_checksum() {
        let d = load_bundled().unwrap();
        assert_eq!((d.len(), d.x.ncols(), d.classes), (1797, 64, 10));
    }
}

//! The list codec: sort ranks as LEB128 deltas, and lists cut into chunks of a row each.

/// Most bytes of delta-coded ranks in a chunk; a fuller chunk is split into chunks of about
/// `CHUNK_FILL`. Searches pay mostly per row read, so chunks are as large as a row can be
/// while PostgreSQL still keeps it inline (about 2 KiB; larger values go to TOAST, a second
/// lookup each). On SQLite (4 KiB pages) such a row spills into an overflow page of its own,
/// mostly empty, which imports write too; chunks under 1,000 bytes stay whole in the B-tree
/// page, but searches that read whole lists (exact card serials) read twice the rows, and
/// were a third slower (p99 11.3 against 6.4 ms on 1,000,000 users), for an import 10% faster.
const CHUNK_MAX: usize = 1_900;
const CHUNK_FILL: usize = 1_300;

/// Bytes of the LEB128 form of `d`.
pub(super) fn delta_len(d: i64) -> usize {
    let bits = 64 - u64::try_from(d).unwrap_or(0).leading_zeros() as usize;
    bits.div_ceil(7).max(1)
}

/// `ranks` (ascending) after the first, as LEB128 deltas.
pub(super) fn encode(ranks: &[i64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ranks.len() * 4);
    for w in ranks.windows(2) {
        let mut d = u64::try_from(w[1] - w[0]).unwrap_or(0);
        loop {
            let byte = (d & 0x7f) as u8;
            d >>= 7;
            if d == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
    }
    out
}

pub(super) fn decode(lo: i64, data: &[u8]) -> Vec<i64> {
    let mut out = Vec::with_capacity(data.len() / 3 + 1);
    decode_into(lo, data, i64::MIN..i64::MAX, &mut out);
    out
}

/// Appends the ranks of the chunk starting at `lo` that are in `range` to `out` (ascending).
pub(super) fn decode_into(lo: i64, data: &[u8], range: std::ops::Range<i64>, out: &mut Vec<i64>) {
    if range.contains(&lo) {
        out.push(lo);
    }
    let (mut value, mut shift, mut last) = (0u64, 0u32, lo);
    for byte in data {
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            last += i64::try_from(value).unwrap_or(0);
            if last >= range.end {
                return;
            }
            if last >= range.start {
                out.push(last);
            }
            (value, shift) = (0, 0);
        } else {
            shift += 7;
        }
    }
}

/// `ranks` (ascending) cut into chunks: one when it fits in `CHUNK_MAX` bytes, else chunks of
/// about `CHUNK_FILL` (room to grow before the next split).
pub(super) fn pieces(ranks: Vec<i64>) -> Vec<Vec<i64>> {
    let size: usize = ranks.windows(2).map(|w| delta_len(w[1] - w[0])).sum();
    if size <= CHUNK_MAX {
        return vec![ranks];
    }
    let mut out = Vec::with_capacity(size / CHUNK_FILL + 1);
    let mut piece: Vec<i64> = Vec::new();
    let mut bytes = 0;
    for r in ranks {
        if let Some(last) = piece.last() {
            let d = delta_len(r - last);
            if bytes + d > CHUNK_FILL {
                out.push(std::mem::take(&mut piece));
                bytes = 0;
            } else {
                bytes += d;
            }
        }
        piece.push(r);
    }
    out.push(piece);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::rank::SPACE;

    #[test]
    fn codec_round_trips() {
        let ranks = vec![5, 6, 200, 1 << 40, (1 << 40) + 3, SPACE - 1];
        assert_eq!(decode(5, &encode(&ranks)), ranks);
        assert_eq!(decode(9, &encode(&[9])), vec![9]);
        let many: Vec<i64> = (0..4_000).map(|i| i * 7 + 1).collect();
        let parts = pieces(many.clone());
        assert!(parts.len() > 1, "{}", parts.len());
        assert!(parts.iter().all(|p| encode(p).len() <= CHUNK_FILL));
        assert_eq!(parts.concat(), many);
        let wide: Vec<i64> = (0..400).map(|i| i << 40).collect();
        assert!(
            pieces(wide.clone())
                .iter()
                .all(|p| encode(p).len() <= CHUNK_FILL)
        );
        assert_eq!(pieces(wide.clone()).concat(), wide);
        assert_eq!(delta_len(127), 1);
        assert_eq!(delta_len(128), 2);
    }
}

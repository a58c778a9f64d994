//! Chunk size and zstd level, measured (docs/benchmarks.md, "Chunk size").
//!
//! `cargo bench --bench chunking` converts one tar with each setting and
//! prints: blob size against whole-stream zstd, frame count, index size, and
//! the expected compressed bytes fetched to serve one random byte of file
//! data (a lazy reader's read amplification). The tar is
//! $HYPERBOX_BENCH_TAR, or a tar of this machine's /usr. Without `--bench`
//! (as under `cargo test`) it checks itself on a small corpus and exits.

use std::time::Instant;

use hyperbox::format::{writer, ChunkParams, EntryKind};

mod corpus;

struct Row {
    label: String,
    blob: u64,
    frames: usize,
    index: u64,
    amplification: f64,
    secs: f64,
    cpu: f64,
}

/// CPU seconds (user + system) this process has used, from /proc.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), in clock ticks (100/s).
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

fn measure(tar: &[u8], avg: u32, level: i32, small: u64) -> Row {
    let opts = writer::WriteOptions {
        chunk: ChunkParams { min: avg / 2, avg, max: avg * 4 },
        level,
        small_file_max: small,
        ..Default::default()
    };
    let (start, cpu) = (Instant::now(), cpu_secs());
    let out = writer::convert_tar(tar, std::io::sink(), &opts).unwrap();
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu;
    let idx = out.index.clone().validate(out.location.offset).unwrap();
    // Size-biased: a random byte of file data lies in a frame with
    // probability proportional to the frame's uncompressed length.
    let mut data_frames = std::collections::BTreeSet::new();
    for e in idx.entries().iter().filter(|e| e.kind == EntryKind::File) {
        data_frames.extend(idx.frames_for(e.data_offset, e.data_len()));
    }
    let (mut num, mut den) = (0f64, 0f64);
    for i in data_frames {
        let f = idx.frames().get(i);
        num += f.c_len as f64 * f.u_len as f64;
        den += f.u_len as f64;
    }
    Row {
        label: format!("{:>4}K avg, L{level}, pack<{}K", avg >> 10, small >> 10),
        blob: out.blob_size,
        frames: out.stats.frames,
        index: out.location.length,
        amplification: num / den.max(1.0),
        secs,
        cpu,
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let tar = match std::env::var_os("HYPERBOX_BENCH_TAR") {
        Some(p) if full => std::fs::read(p).expect("HYPERBOX_BENCH_TAR"),
        _ => corpus::usr_tar(&["/usr/bin", "/usr/share/doc"], if full { 256 << 20 } else { 8 << 20 }),
    };
    let whole = zstd::bulk::compress(&tar, 3).unwrap().len() as u64;
    println!("tar {:.1} MB, whole-stream zstd -3: {:.1} MB", tar.len() as f64 / 1e6, whole as f64 / 1e6);
    let d = writer::WriteOptions::default();
    let (avg, level, small) = (d.chunk.avg, d.level, d.small_file_max);
    let sweep: Vec<(u32, i32, u64)> = if full {
        let mut v: Vec<(u32, i32, u64)> = [0u64, 4, 16, 64].iter().map(|k| (avg, level, k << 10)).collect();
        v.extend([32u32, 64, 256, 512, 1024].iter().map(|k| (k << 10, level, small)));
        v.extend([1, 2, 5].iter().map(|&l| (avg, l, small)));
        v
    } else {
        vec![(64 << 10, 3, 0), (avg, 1, small)]
    };
    println!(
        "{:<26} {:>8} {:>8} {:>8} {:>9} {:>13} {:>7} {:>10}",
        "setting", "blob MB", "vs zstd", "frames", "index KB", "fetch/byte KB", "MB/s", "MB/cpu-s"
    );
    for (avg, level, small) in sweep {
        let r = measure(&tar, avg, level, small);
        assert!(r.blob > 0 && r.frames > 0);
        println!(
            "{:<26} {:>8.1} {:>7.1}% {:>8} {:>9.1} {:>13.1} {:>7.0} {:>10.0}",
            r.label,
            r.blob as f64 / 1e6,
            (r.blob as f64 / whole as f64 - 1.0) * 100.0,
            r.frames,
            r.index as f64 / 1e3,
            r.amplification / 1e3,
            tar.len() as f64 / 1e6 / r.secs,
            tar.len() as f64 / 1e6 / r.cpu.max(0.01)
        );
    }
}

use super::*;
use bytes::Bytes;

fn rec(seq: u64) -> Arc<Record> {
    Arc::new(Record {
        seq,
        topic: "t/d".into(),
        payload: Bytes::from(format!("{{\"seq\":{seq},\"historical\":false}}")),
        flag_offset: crate::buffer::NO_FLAG,
    })
}

/// The sequence numbers a replay from the start reads, in order.
fn seqs_on_disk(b: &Buffer) -> Vec<u64> {
    let records = b.read_range(0, u64::MAX, 1000, |_| false).unwrap();
    records.iter().map(|r| r.seq).collect()
}

#[test]
fn committed_records_survive_reopen_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer");
    {
        let (b, _) = Buffer::open(&path).unwrap();
        b.commit(&[rec(3), rec(1), rec(2)]).unwrap();
        b.commit(&[rec(4)]).unwrap();
        b.remove(&[2, 4]).unwrap();
        let left = b.read_range(0, u64::MAX, 10, |_| false).unwrap();
        assert_eq!(left.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(b.len(), 2);
    }
    let (b, report) = Buffer::open(&path).unwrap();
    // A chunk acknowledged in part comes back whole (2 is sent again, as a re-send); one
    // acknowledged in full is gone.
    assert_eq!(report.records, 3);
    // 4 is gone from the disk, but the watermark says it was committed: a seq in use.
    assert_eq!(report.last_seq, Some(4));
    let all = b.read_range(0, u64::MAX, 10, |_| false).unwrap();
    assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(b.first_seq(), Some(1));
    assert_eq!(report.lost_commits, None, "nothing was lost");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn a_generation_that_went_back_to_before_a_durable_commit_is_reported_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer");
    let saved = dir.path().join("saved");
    {
        let (b, _) = Buffer::open(&path).unwrap();
        b.commit(&[rec(1), rec(2)]).unwrap();
        // What the disk holds after the first commit; the second is then lost, as a disk
        // that drops fsynced writes (or a storage bug) would lose it.
        copy_dir(&gen_dir(&path, 1), &saved);
        b.commit(&[rec(3), rec(4)]).unwrap();
        b.remove(&[1]).unwrap();
    }
    std::fs::remove_dir_all(gen_dir(&path, 1)).unwrap();
    copy_dir(&saved, &gen_dir(&path, 1));
    let (b, report) = Buffer::open(&path).unwrap();
    assert_eq!(
        report.lost_commits,
        Some(LostCommits {
            generation: 1,
            committed_through: 4,
            found_through: Some(2),
        })
    );
    // What is left is still served.
    let left = b.read_range(0, u64::MAX, 10, |_| false).unwrap();
    assert_eq!(left.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
}

#[test]
fn a_generation_acknowledged_to_the_end_is_not_reported_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer");
    {
        let (b, _) = Buffer::open(&path).unwrap();
        b.commit(&[rec(1), rec(2)]).unwrap();
        b.remove(&[1, 2]).unwrap();
        b.commit(&[rec(3)]).unwrap();
        b.remove(&[3]).unwrap();
    }
    let (_, report) = Buffer::open(&path).unwrap();
    assert_eq!(report.records, 0);
    assert_eq!(report.lost_commits, None);
}

#[test]
fn the_oldest_records_age_follows_acknowledgements_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer");
    {
        let (b, _) = Buffer::open(&path).unwrap();
        assert_eq!(b.oldest_age(), None);
        b.commit(&[rec(1)]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        b.commit(&[rec(2)]).unwrap();
        assert!(b.oldest_age().unwrap() >= Duration::from_millis(300));
        b.remove(&[1]).unwrap();
        assert!(b.oldest_age().unwrap() < Duration::from_millis(300));
    }
    let (b, _) = Buffer::open(&path).unwrap();
    assert!(
        b.oldest_age().unwrap() >= Duration::from_millis(300),
        "counted from the generation's first commit"
    );
    b.remove(&[2]).unwrap();
    assert_eq!(b.oldest_age(), None);
}

#[test]
fn a_generation_whose_fsync_failed_takes_no_more_writes_and_its_records_survive() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _) = Buffer::open(dir.path()).unwrap();
    let commit = |r: std::ops::Range<u64>| b.commit(&r.map(rec).collect::<Vec<_>>());
    commit(0..10).unwrap();
    commit(10..20).unwrap();
    let before = b.generations();
    b.faults.fail_syncs(true);
    assert!(commit(20..30).is_err());
    b.faults.fail_syncs(false);
    // The retry goes to a fresh generation; the failed one keeps what it had.
    commit(20..30).unwrap();
    assert_eq!(b.generations(), before + 1);
    assert_eq!(b.len(), 30);
    // A whole chunk acknowledged would be deleted from a sound generation; from this one
    // it is not, so a restart sends it again.
    b.remove(&(0..10).collect::<Vec<_>>()).unwrap();
    assert_eq!(b.len(), 20);
    b.close().unwrap();
    drop(b);
    let (b, report) = Buffer::open(dir.path()).unwrap();
    let mut seqs: Vec<u64> = seqs_on_disk(&b);
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs, (0..30).collect::<Vec<_>>(), "{report:?}");
    assert!(report.lost_commits.is_none(), "{report:?}");
}

#[test]
fn replays_and_acknowledgements_do_not_wait_for_a_commit_in_progress() {
    use std::sync::mpsc::channel;
    let dir = tempfile::tempdir().unwrap();
    let (b, _) = Buffer::open(dir.path()).unwrap();
    b.commit(&(0..10).map(rec).collect::<Vec<_>>()).unwrap();
    let (entered_tx, entered) = channel();
    let (go, go_rx) = channel();
    b.faults.pause_commits(Some((entered_tx, go_rx)));
    std::thread::scope(|scope| {
        let committer = scope.spawn(|| b.commit(&(10..20).map(rec).collect::<Vec<_>>()));
        entered.recv().unwrap();
        let (done_tx, done) = channel();
        let b = &b;
        scope.spawn(move || {
            let read = b.read_range(0, u64::MAX, 100, |_| false).map(|r| r.len());
            let removed = b.remove(&[0, 1]);
            let _ = done_tx.send((read, removed));
        });
        let outcome = done.recv_timeout(Duration::from_secs(5));
        go.send(()).unwrap();
        let (read, removed) = outcome.expect("a read waited for the commit to finish");
        assert_eq!(read.unwrap(), 10, "only what is durable is read");
        removed.unwrap();
        committer.join().unwrap().unwrap();
    });
    b.faults.pause_commits(None);
    assert_eq!(b.len(), 18);
    let seqs: Vec<u64> = seqs_on_disk(&b);
    assert_eq!(seqs, (2..20).collect::<Vec<_>>());
}

#[test]
fn a_panic_inside_a_commit_leaves_its_generation_deletable_once_drained() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _) = Buffer::open(dir.path()).unwrap();
    let commit = |r: std::ops::Range<u64>| b.commit(&r.map(rec).collect::<Vec<_>>());
    commit(0..10).unwrap();
    b.faults.panic_commits(true);
    assert!(matches!(commit(10..20), Err(BufferError::Panicked(_))));
    b.faults.panic_commits(false);
    commit(10..20).unwrap();
    assert_eq!(b.generations(), 2);
    b.remove(&(0..20).collect::<Vec<_>>()).unwrap();
    assert_eq!(b.generations(), 1, "the drained generation is deleted");
    commit(20..30).unwrap();
    assert_eq!(b.evict_oldest_generation().unwrap(), 10);
}

#[test]
fn a_frozen_generation_is_never_reopened_so_a_replay_writes_nothing_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let commit = |b: &Buffer, r: std::ops::Range<u64>| b.commit(&r.map(rec).collect::<Vec<_>>());
    {
        let (b, _) = Buffer::open(dir.path()).unwrap();
        commit(&b, 0..10).unwrap();
        b.close().unwrap();
    }
    // gen-1 holds records from before the restart; gen-2 takes commits.
    let (b, _) = Buffer::open(dir.path()).unwrap();
    commit(&b, 10..20).unwrap();
    b.faults.fail_syncs(true);
    assert!(commit(&b, 20..30).is_err());
    b.faults.fail_syncs(false);
    commit(&b, 20..30).unwrap();
    let frozen_db = dir.path().join("gen-2").join("db");
    let size = std::fs::metadata(&frozen_db).unwrap().len();
    assert_eq!(seqs_on_disk(&b), (0..30).collect::<Vec<_>>());
    b.remove(&(0..10).collect::<Vec<_>>()).unwrap();
    assert_eq!(seqs_on_disk(&b), (10..30).collect::<Vec<_>>());
    assert_eq!(std::fs::metadata(&frozen_db).unwrap().len(), size);
    b.remove(&(10..20).collect::<Vec<_>>()).unwrap();
    assert!(!frozen_db.exists(), "deleted once drained");
}

#[test]
fn a_record_found_in_two_generations_goes_from_both_once_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _) = Buffer::open(dir.path()).unwrap();
    let commit = |r: std::ops::Range<u64>| b.commit(&r.map(rec).collect::<Vec<_>>());
    commit(0..5).unwrap();
    b.faults.fail_syncs(true);
    assert!(commit(5..10).is_err());
    b.faults.fail_syncs(false);
    commit(5..10).unwrap();
    b.close().unwrap();
    drop(b);
    // The failed batch reached the disk after all: both generations hold it.
    let (b, report) = Buffer::open(dir.path()).unwrap();
    assert_eq!(report.records, 15, "{report:?}");
    b.remove(&(0..10).collect::<Vec<_>>()).unwrap();
    assert!(b.is_empty(), "{} left", b.len());
    assert!(seqs_on_disk(&b).is_empty());
}

#[test]
fn a_generation_from_a_newer_version_is_set_aside_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer");
    {
        let (b, _) = Buffer::open(&path).unwrap();
        b.commit(&(1..=3).map(rec).collect::<Vec<_>>()).unwrap();
        let mut gens = b.lock();
        let g = gens.last_mut().unwrap();
        g.store().unwrap().put_raw(9, &[0xC7, 1, 2, 3]);
        drop(gens);
        b.close().unwrap();
    }
    let (b, report) = Buffer::open(&path).unwrap();
    let aside = report.quarantined.first().expect("set aside").path.clone();
    assert!(aside.exists());
    assert_eq!((report.records, report.damaged), (0, 0));
    assert!(b.is_empty());
}

#[test]
fn a_damaged_record_in_a_chunk_is_dropped_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer");
    let records = [rec(1), rec(2), rec(3)];
    let (b, _) = Buffer::open(&path).unwrap();
    b.commit(&records).unwrap();
    // The disk returns the chunk with the second record's payload damaged (in the plain
    // form, which a chunk that does not compress and one from an earlier version take).
    let mut value = chunk::encode_plain(&records);
    let second = 5 + 4 + records[0].stored_len() + 4 + 25;
    value[second] ^= 0x55;
    {
        let mut gens = b.lock();
        let g = gens.last_mut().unwrap();
        g.store().unwrap().put_raw(1, &value);
    }
    let got = b.read_range(0, u64::MAX, 10, |_| false).unwrap();
    assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 3]);
    assert_eq!(b.len(), 2, "the damaged record is no longer counted");
    drop(b);
    let (_, report) = Buffer::open(&path).unwrap();
    assert_eq!((report.records, report.damaged), (2, 1));
}

#[test]
fn damage_in_a_deflated_chunk_loses_the_records_from_it_on_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer");
    let records: Vec<_> = (1..=20).map(rec).collect();
    let (b, _) = Buffer::open(&path).unwrap();
    b.commit(&records).unwrap();
    let mut value = chunk::encode(&records);
    assert_ne!(value[0], 0xC1, "deflated");
    let cut = value.len() * 3 / 4;
    value.truncate(cut);
    {
        let mut gens = b.lock();
        let g = gens.last_mut().unwrap();
        g.store().unwrap().put_raw(1, &value);
    }
    let got: Vec<u64> = seqs_on_disk(&b);
    assert!(!got.is_empty() && got.len() < 20, "{got:?}");
    assert_eq!(got, (1..=got.len() as u64).collect::<Vec<_>>());
    assert_eq!(
        b.len(),
        got.len() as u64,
        "the lost records are no longer counted"
    );
    drop(b);
    let (_, report) = Buffer::open(&path).unwrap();
    assert_eq!(report.records + report.damaged, 20, "{report:?}");
}

#[test]
fn a_generation_from_an_earlier_version_opens_with_its_segment_size_and_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer");
    {
        // As an earlier version wrote it: 8 MiB segments, one record per value.
        let values: Vec<_> = [5u64, 6].map(|seq| (seq, rec(seq).to_bytes())).into();
        store::write_raw(&gen_dir(&path, 3), true, &values);
    }
    let (b, report) = Buffer::open(&path).unwrap();
    assert!(report.quarantined.is_empty(), "not set aside");
    assert_eq!(report.records, 2);
    let all = b.read_range(0, u64::MAX, 10, |_| false).unwrap();
    assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![5, 6]);
    b.remove(&[5, 6]).unwrap();
    assert_eq!(b.len(), 0);
}

#[test]
fn a_replay_in_steps_across_generations_reads_every_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _) = Buffer::open_with(dir.path(), 64 << 10, 16 << 10).unwrap();
    let n = 3000u64;
    for chunk in (0..n).collect::<Vec<_>>().chunks(10) {
        b.commit(&chunk.iter().map(|&s| big(s)).collect::<Vec<_>>())
            .unwrap();
    }
    assert!(b.generations() > 10, "{} generations", b.generations());
    // As the publisher replays: 64 at a time from a cursor, acknowledging as it goes, with
    // commits of new records in between.
    let mut seen = Vec::new();
    let mut from = 0;
    let mut next_new = n;
    loop {
        let got = b.read_range(from, u64::MAX, 64, |_| false).unwrap();
        let Some(last) = got.last().map(|r| r.seq) else {
            break;
        };
        from = last + 1;
        let seqs: Vec<u64> = got.iter().map(|r| r.seq).collect();
        b.remove(&seqs).unwrap();
        seen.extend(seqs);
        if next_new < n + 200 {
            b.commit(&(next_new..next_new + 10).map(big).collect::<Vec<_>>())
                .unwrap();
            next_new += 10;
        }
    }
    assert_eq!(seen, (0..next_new).collect::<Vec<_>>());
    assert_eq!(b.len(), 0);
}

#[test]
fn read_range_skips_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _) = Buffer::open(dir.path()).unwrap();
    b.commit(&(0..10).map(rec).collect::<Vec<_>>()).unwrap();
    let got = b.read_range(2, 9, 3, |s| s == 3).unwrap();
    assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2, 4, 5]);
    assert!(b.read_range(5, 5, 3, |_| false).unwrap().is_empty());
}

fn big(seq: u64) -> Arc<Record> {
    // Chunks are deflated: these must take their size on disk.
    crate::buffer::incompressible(seq, 1000)
}

#[test]
fn commits_rotate_into_generations_that_read_back_oldest_first_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer");
    {
        let (b, _) = Buffer::open_with(&path, 64 << 10, 16 << 10).unwrap();
        for chunk in (0..400u64).collect::<Vec<_>>().chunks(20) {
            b.commit(&chunk.iter().map(|&s| big(s)).collect::<Vec<_>>())
                .unwrap();
        }
        assert!(b.generations() >= 4, "{} generations", b.generations());
        assert!(
            b.open_generations() <= 2,
            "only the newest and the oldest holding records stay open: {}",
            b.open_generations()
        );
        // 200 lies in a sealed generation in the middle; 20..40 is a whole commit.
        b.remove(&[0, 1, 200, 399]).unwrap();
        b.remove(&(20..40).collect::<Vec<_>>()).unwrap();
        let first = b.read_range(0, 45, 10, |_| false).unwrap();
        let first: Vec<u64> = first.iter().map(|r| r.seq).collect();
        assert_eq!(first, [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        let middle = b.read_range(199, 202, 10, |_| false).unwrap();
        assert_eq!(middle.iter().map(|r| r.seq).collect::<Vec<_>>(), [199, 201]);
        assert!(b.open_generations() <= 3, "the one being read stays open");
    }
    let (b, report) = Buffer::open_with(&path, 64 << 10, 16 << 10).unwrap();
    // Chunks acknowledged in part come back whole; the one acknowledged in full is gone.
    assert_eq!(report.records, 380);
    assert_eq!(report.last_seq, Some(399));
    assert_eq!(b.first_seq(), Some(0));
    let all = b.read_range(0, u64::MAX, 1000, |_| false).unwrap();
    let seqs: Vec<u64> = all.iter().map(|r| r.seq).collect();
    assert_eq!(
        seqs,
        (0..400)
            .filter(|s| !(20..40).contains(s))
            .collect::<Vec<_>>(),
        "oldest first across generations"
    );
    let some = b.read_range(50, 300, 10, |s| s % 2 == 0).unwrap();
    assert_eq!(
        some.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (51..70).step_by(2).collect::<Vec<_>>()
    );
}

#[test]
fn space_comes_back_after_a_drain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer");
    let (b, _) = Buffer::open_with(&path, 256 << 10, 64 << 10).unwrap();
    let empty = b.disk_usage();
    for chunk in (0..3000u64).collect::<Vec<_>>().chunks(50) {
        b.commit(&chunk.iter().map(|&s| big(s)).collect::<Vec<_>>())
            .unwrap();
    }
    let full = b.disk_usage();
    assert!(full > 3_000_000, "3 MB of records take {full} bytes");
    for chunk in (0..3000u64).collect::<Vec<_>>().chunks(100) {
        b.remove(chunk).unwrap();
    }
    assert!(b.is_empty());
    let drained = b.disk_usage();
    assert!(
        drained <= empty + (512 << 10),
        "after the drain {drained} bytes remain (empty: {empty}, full: {full})"
    );
    assert!(b.generations() <= 2, "{} generations", b.generations());
}

#[test]
fn evicting_the_oldest_generation_gives_its_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _) = Buffer::open_with(dir.path(), 64 << 10, 16 << 10).unwrap();
    for chunk in (0..300u64).collect::<Vec<_>>().chunks(20) {
        b.commit(&chunk.iter().map(|&s| big(s)).collect::<Vec<_>>())
            .unwrap();
    }
    let (usage, len) = (b.disk_usage(), b.len());
    let dropped = b.evict_oldest_generation().unwrap();
    assert!(dropped > 0);
    assert_eq!(b.len(), len - dropped);
    assert!(b.disk_usage() < usage);
    assert_eq!(b.first_seq(), Some(dropped), "the oldest records went");
    // Down to one generation: the next eviction empties it through a fresh one.
    while b.generations() > 1 {
        b.evict_oldest_generation().unwrap();
    }
    let left = b.len();
    assert_eq!(b.evict_oldest_generation().unwrap(), left);
    assert!(b.is_empty());
    b.commit(&[big(1000)]).unwrap();
    assert_eq!(b.evict_oldest_generation().unwrap(), 1);
    assert!(b.is_empty());
}

#[test]
fn a_buffer_from_before_generations_keeps_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer");
    {
        let values: Vec<_> = [7u64, 8].map(|seq| (seq, rec(seq).to_bytes())).into();
        store::write_raw(&path, false, &values);
    }
    let (b, report) = Buffer::open(&path).unwrap();
    assert_eq!(report.records, 2);
    assert!(path.join("gen-0").join("db").exists());
    assert!(!path.join("db").exists());
    let got = b.read_range(0, u64::MAX, 10, |_| false).unwrap();
    assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![7, 8]);
}

#[test]
fn an_interrupted_deletion_is_finished_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer");
    std::fs::create_dir_all(path.join("gen-3.drained").join("blobs")).unwrap();
    std::fs::write(path.join("gen-3.drained").join("db"), b"half deleted").unwrap();
    let (b, report) = Buffer::open(&path).unwrap();
    assert!(report.quarantined.is_empty());
    assert!(!path.join("gen-3.drained").exists());
    b.commit(&[rec(1)]).unwrap();
    assert_eq!(b.len(), 1);
}

#[test]
fn a_garbage_database_is_quarantined_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer");
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(path.join("conf"), b"\xff\xfe garbage").unwrap();
    std::fs::write(path.join("db"), vec![0xAB; 4096]).unwrap();
    let (b, report) = Buffer::open(&path).unwrap();
    let aside = report
        .quarantined
        .first()
        .expect("quarantined")
        .path
        .clone();
    assert!(aside.join("db").exists(), "the damaged file is kept");
    b.commit(&[rec(1)]).unwrap();
    assert_eq!(b.len(), 1);
}

/// Commits `seqs` in a buffer of their own start: each call is a generation of its own, since
/// commits go to a fresh generation after every open.
fn commit_in_own_generation(path: &Path, seqs: std::ops::RangeInclusive<u64>) {
    let (b, _) = Buffer::open(path).unwrap();
    b.commit(&seqs.map(rec).collect::<Vec<_>>()).unwrap();
    b.close().unwrap();
}

/// The generation directories under the buffer at `path`.
fn generation_dirs(path: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(path)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("db").exists())
        .collect();
    dirs.sort();
    dirs
}

/// What a cut leaves of a snapshot file whose data never reached the disk: the right length,
/// zeros inside, so its checksum does not match. Named to sort after every real snapshot, as
/// sled picks the last name.
fn torn_snapshot(dir: &Path, name: &str) {
    std::fs::write(dir.join(name), vec![0u8; 64]).unwrap();
}

#[test]
fn a_snapshot_left_unfinished_by_a_cut_loses_no_committed_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer");
    commit_in_own_generation(&path, 1..=20);
    for gen in generation_dirs(&path) {
        torn_snapshot(&gen, "snap.FFFFFFFFFFFFFFFF.generating");
    }
    let (b, report) = Buffer::open(&path).unwrap();
    assert!(report.quarantined.is_empty(), "{report:?}");
    assert_eq!(seqs_on_disk(&b), (1..=20).collect::<Vec<_>>());
    for gen in generation_dirs(&path) {
        assert!(!gen.join("snap.FFFFFFFFFFFFFFFF.generating").exists());
    }
}

#[test]
fn a_generation_whose_snapshot_is_torn_opens_from_its_log_and_keeps_the_snapshot_aside() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer");
    commit_in_own_generation(&path, 1..=20);
    let gens = generation_dirs(&path);
    for gen in &gens {
        torn_snapshot(gen, "snap.FFFFFFFFFFFFFFFF");
    }
    let (b, report) = Buffer::open(&path).unwrap();
    assert!(report.quarantined.is_empty(), "{report:?}");
    assert_eq!(seqs_on_disk(&b), (1..=20).collect::<Vec<_>>());
    let kept = gens
        .iter()
        .filter(|g| g.join("set-aside-snapshots/snap.FFFFFFFFFFFFFFFF").exists())
        .count();
    assert_eq!(kept, gens.len(), "the snapshot is kept, set aside");
}

/// `n` generations of ten records each (seqs 1 to 10 in the first, and so on); their
/// directories, oldest first.
fn generations_of_ten(path: &Path, n: u64) -> Vec<PathBuf> {
    for i in 0..n {
        commit_in_own_generation(path, i * 10 + 1..=i * 10 + 10);
    }
    let gens = generation_dirs(path);
    assert_eq!(gens.len() as u64, n, "{gens:?}");
    gens
}

/// Makes a generation's database unopenable, with or without its snapshots.
fn garble(gen: &Path) {
    std::fs::write(gen.join("conf"), b"\xff\xfe garbage").unwrap();
    std::fs::write(gen.join("db"), vec![0xAB; 4096]).unwrap();
}

#[test]
fn two_unopenable_generations_are_both_moved_aside_and_the_buffer_starts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer");
    let gens = generations_of_ten(&path, 3);
    garble(&gens[0]);
    garble(&gens[1]);
    let (b, report) = Buffer::open(&path).unwrap();
    assert_eq!(report.quarantined.len(), 2, "{report:?}");
    assert_ne!(report.quarantined[0].path, report.quarantined[1].path);
    assert!(report
        .quarantined
        .iter()
        .all(|q| q.path.join("db").exists()));
    assert_eq!(seqs_on_disk(&b), (21..=30).collect::<Vec<_>>());
}

#[test]
fn a_quarantine_says_how_many_committed_records_it_puts_at_stake() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer");
    let gens = generations_of_ten(&path, 3);
    garble(&gens[1]);
    let (b, report) = Buffer::open(&path).unwrap();
    let q = &report.quarantined[..];
    assert_eq!(q.len(), 1, "{report:?}");
    assert_eq!(
        q[0].at_stake,
        Some(10),
        "seqs 11 to 20 lie between its neighbours"
    );
    assert!(q[0]
        .path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("quarantine-gen-")));
    assert_eq!(report.records, 20);
    assert_eq!(b.len(), 20);
}

#[test]
fn a_quarantine_name_already_taken_gets_a_number() {
    let dir = tempfile::tempdir().unwrap();
    let taken = dir.path().join("quarantine-gen-4-1000");
    std::fs::create_dir(&taken).unwrap();
    let name = store::fresh_name(dir.path(), "quarantine-gen-4-1000");
    assert_eq!(name, dir.path().join("quarantine-gen-4-1000-2"));
    std::fs::create_dir(&name).unwrap();
    assert_eq!(
        store::fresh_name(dir.path(), "quarantine-gen-4-1000"),
        dir.path().join("quarantine-gen-4-1000-3")
    );
}

#[test]
fn a_watermark_older_than_the_quarantined_generation_never_makes_it_look_empty() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer");
    let gens = generations_of_ten(&path, 2);
    let first: u64 = gens[0]
        .to_string_lossy()
        .rsplit("gen-")
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // What a cut can leave: the watermark's rename of the newer commits never made durable.
    Watermark {
        generation: first,
        committed_through: 10,
        acked_below: 1,
    }
    .write(&path)
    .unwrap();
    garble(&gens[1]);
    let (_, report) = Buffer::open(&path).unwrap();
    assert_eq!(report.quarantined.len(), 1, "{report:?}");
    assert_ne!(report.quarantined[0].at_stake, Some(0), "{report:?}");
}

#[test]
fn a_directory_made_durably_exists_with_its_parents() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("a").join("b").join("c");
    create_dir_durable(&deep).unwrap();
    assert!(deep.is_dir());
    create_dir_durable(&deep).unwrap();
    let relative = Path::new("target-test-relative-dir-made-durably");
    let _ = std::fs::remove_dir(relative);
    create_dir_durable(relative).unwrap();
    assert!(relative.is_dir());
    std::fs::remove_dir(relative).unwrap();
}

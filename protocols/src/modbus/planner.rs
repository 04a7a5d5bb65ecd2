//! Read planning: turns a device's tags into the fewest block reads the device accepts.
//!
//! Design: tags are sorted by (area, offset) and swept once. The open block takes the next tag
//! when the unused registers (or bits) between the block's end and the tag's start are within
//! the gap limit and the merged block stays within the read limit; otherwise the block is
//! closed and the tag opens a new one. For tags sorted by start this greedy sweep is optimal.
//! A tag wider than the read limit gets a block of its own (never truncated), and overlapping
//! tags simply extend the block to the furthest end. All arithmetic on register numbers is
//! done in `u32` so that a tag reaching past 65535 cannot overflow; such a tag is cut at the
//! end of the address space. [`Block::split`] lets the scanner narrow down a read the device
//! refuses, one tag boundary at a time.

use super::{Address, Area};
use crate::model::TagId;

/// Size of a Modbus address space: register (or bit) numbers are below this.
const SPACE: u32 = 1 << 16;

/// One tag's place in a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    /// The tag.
    pub tag: TagId,
    /// First register (or bit) of the tag, relative to the block start.
    pub offset: u16,
    /// Registers (or bits) of the tag, cut where the address space ends.
    pub width: u16,
}

/// One read request: contiguous registers (or bits) of one area, covering several tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Block {
    /// The area read.
    pub area: Area,
    /// First register (or bit) read.
    pub start: u16,
    /// Number of registers (or bits) read.
    pub count: u16,
    /// The tags in the block, by offset.
    pub slots: Vec<Slot>,
}

/// Limits of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Largest number of registers in one read (holding and input registers).
    pub max_registers: u16,
    /// Largest number of bits in one read (coils and discrete inputs).
    pub max_bits: u16,
    /// Largest run of unused registers read to merge two tags.
    pub max_gap_registers: u16,
    /// Largest run of unused bits read to merge two tags.
    pub max_gap_bits: u16,
}

impl Limits {
    /// The read limit and the gap limit that apply to an area.
    fn for_area(self, area: Area) -> (u32, u32) {
        if area.is_bit() {
            (self.max_bits.into(), self.max_gap_bits.into())
        } else {
            (self.max_registers.into(), self.max_gap_registers.into())
        }
    }
}

/// A tag's range in the address space, end exclusive.
#[derive(Debug, Clone, Copy)]
struct Span {
    area: Area,
    start: u32,
    end: u32,
    tag: TagId,
}

/// A block being built: absolute, end-exclusive range plus its tags.
struct Open {
    area: Area,
    start: u32,
    end: u32,
    spans: Vec<Span>,
}

impl Open {
    /// A block holding one tag.
    fn new(span: Span) -> Self {
        Open {
            area: span.area,
            start: span.start,
            end: span.end,
            spans: vec![span],
        }
    }

    /// Whether the tag, which starts at or after the block, may join it.
    fn accepts(&self, span: &Span, limits: Limits) -> bool {
        let (max, max_gap) = limits.for_area(self.area);
        span.area == self.area
            && span.start.saturating_sub(self.end) <= max_gap
            && self.end.max(span.end) - self.start <= max
    }

    /// Adds a tag accepted by [`Open::accepts`].
    fn push(&mut self, span: Span) {
        self.end = self.end.max(span.end);
        self.spans.push(span);
    }

    /// The finished read request.
    fn finish(self) -> Block {
        let slots = self
            .spans
            .iter()
            .map(|s| Slot {
                tag: s.tag,
                offset: to_u16(s.start - self.start),
                width: to_u16(s.end - s.start),
            })
            .collect();
        Block {
            area: self.area,
            start: to_u16(self.start),
            count: to_u16(self.end - self.start),
            slots,
        }
    }
}

/// Narrows a value known to fit (by construction) into a `u16`, saturating otherwise.
fn to_u16(x: u32) -> u16 {
    u16::try_from(x).unwrap_or(u16::MAX)
}

/// Plans the fewest reads that cover the tags: (tag id, address, width in registers or bits).
pub(crate) fn plan(tags: &[(TagId, Address, u16)], limits: Limits) -> Vec<Block> {
    let mut spans: Vec<Span> = tags
        .iter()
        .map(|&(tag, address, width)| {
            let start = u32::from(address.offset);
            Span {
                area: address.area,
                start,
                end: (start + u32::from(width.max(1))).min(SPACE),
                tag,
            }
        })
        .collect();
    spans.sort_by_key(|s| (s.area, s.start, s.end, s.tag));

    let mut blocks = Vec::new();
    let mut open: Option<Open> = None;
    for span in spans {
        match open.as_mut() {
            Some(current) if current.accepts(&span, limits) => current.push(span),
            _ => {
                if let Some(done) = open.replace(Open::new(span)) {
                    blocks.push(done.finish());
                }
            }
        }
    }
    blocks.extend(open.map(Open::finish));
    blocks
}

impl Block {
    /// Splits a block in two at a tag boundary (at the largest gap between tags, else in the middle),
    /// each half shrunk to its tags' extent; None when it holds one tag or tags that all overlap.
    ///
    /// A boundary is a place in offset order where every tag before it ends at or before the
    /// first tag after it starts, so the halves never share a register; ties between equal gaps
    /// go to the boundary nearest the middle.
    pub(crate) fn split(&self) -> Option<(Block, Block)> {
        let mut slots = self.slots.clone();
        slots.sort_by_key(|s| s.offset);
        let first = u32::from(slots.first()?.offset);
        let last = slots.iter().map(slot_end).max()?;

        // (index of the first slot of the right half, gap, distance from the middle), doubled
        // positions so the middle needs no fraction.
        let mut best: Option<(usize, u32, u32)> = None;
        let mut left_end = 0;
        for (k, pair) in slots.windows(2).enumerate() {
            left_end = left_end.max(slot_end(&pair[0]));
            let next = u32::from(pair[1].offset);
            if next < left_end {
                continue;
            }
            let gap = next - left_end;
            let distance = (left_end + next).abs_diff(first + last);
            let better = match best {
                None => true,
                Some((_, g, d)) => gap > g || (gap == g && distance < d),
            };
            if better {
                best = Some((k + 1, gap, distance));
            }
        }
        let (cut, _, _) = best?;
        let (left, right) = slots.split_at(cut);
        Some((self.part(left), self.part(right)))
    }

    /// The block reading just these slots of this block.
    fn part(&self, slots: &[Slot]) -> Block {
        let min = slots.iter().map(|s| s.offset).min().unwrap_or(0);
        let start = (u32::from(self.start) + u32::from(min)).min(SPACE - 1);
        let end = slots
            .iter()
            .map(|s| u32::from(self.start) + slot_end(s))
            .max()
            .unwrap_or(start)
            .clamp(start, SPACE);
        Block {
            area: self.area,
            start: to_u16(start),
            count: to_u16(end - start),
            slots: slots
                .iter()
                .map(|s| Slot {
                    offset: s.offset - min,
                    ..*s
                })
                .collect(),
        }
    }
}

/// End of a slot relative to its block, exclusive.
fn slot_end(slot: &Slot) -> u32 {
    u32::from(slot.offset) + u32::from(slot.width)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const AREAS: [Area; 4] = [
        Area::Coil,
        Area::DiscreteInput,
        Area::HoldingRegister,
        Area::InputRegister,
    ];

    fn limits(max: u16, gap: u16) -> Limits {
        Limits {
            max_registers: max,
            max_bits: max,
            max_gap_registers: gap,
            max_gap_bits: gap,
        }
    }

    fn at(area: Area, offset: u16) -> Address {
        Address { area, offset }
    }

    /// Holding-register tags from (offset, width), ids in order.
    fn hr(tags: &[(u16, u16)]) -> Vec<(TagId, Address, u16)> {
        tags.iter()
            .enumerate()
            .map(|(i, &(o, w))| (TagId(i as u32), at(Area::HoldingRegister, o), w))
            .collect()
    }

    /// (start, count) of each block.
    fn ranges(blocks: &[Block]) -> Vec<(u16, u16)> {
        blocks.iter().map(|b| (b.start, b.count)).collect()
    }

    fn slot(tag: u32, offset: u16, width: u16) -> Slot {
        Slot {
            tag: TagId(tag),
            offset,
            width,
        }
    }

    #[test]
    fn no_tags_no_blocks() {
        assert!(plan(&[], limits(125, 10)).is_empty());
    }

    #[test]
    fn merges_within_gap() {
        let blocks = plan(&hr(&[(0, 2), (5, 2)]), limits(125, 3));
        assert_eq!(ranges(&blocks), [(0, 7)]);
        assert_eq!(blocks[0].slots, [slot(0, 0, 2), slot(1, 5, 2)]);
    }

    #[test]
    fn does_not_merge_beyond_gap() {
        let blocks = plan(&hr(&[(0, 2), (6, 2)]), limits(125, 3));
        assert_eq!(ranges(&blocks), [(0, 2), (6, 2)]);
        assert_eq!(blocks[1].slots, [slot(1, 0, 2)]);
    }

    #[test]
    fn max_registers_boundary_is_exact() {
        let blocks = plan(&hr(&[(0, 1), (124, 1)]), limits(125, 200));
        assert_eq!(ranges(&blocks), [(0, 125)]);
        let blocks = plan(&hr(&[(0, 1), (125, 1)]), limits(125, 200));
        assert_eq!(ranges(&blocks), [(0, 1), (125, 1)]);
        // A two-register tag whose second register would be the 126th.
        let blocks = plan(&hr(&[(0, 1), (124, 2)]), limits(125, 200));
        assert_eq!(ranges(&blocks), [(0, 1), (124, 2)]);
    }

    #[test]
    fn separate_areas_are_never_merged() {
        let tags: Vec<_> = AREAS
            .iter()
            .rev()
            .enumerate()
            .map(|(i, &a)| (TagId(i as u32), at(a, 0), 1))
            .collect();
        let blocks = plan(&tags, limits(2000, 100));
        let areas: Vec<Area> = blocks.iter().map(|b| b.area).collect();
        assert_eq!(areas, AREAS);
        assert!(blocks.iter().all(|b| b.count == 1 && b.slots.len() == 1));
    }

    #[test]
    fn bit_areas_use_bit_limits() {
        let tags: Vec<_> = [0u16, 1000, 1999, 2000]
            .iter()
            .enumerate()
            .map(|(i, &o)| (TagId(i as u32), at(Area::Coil, o), 1))
            .collect();
        let l = Limits {
            max_registers: 125,
            max_bits: 2000,
            max_gap_registers: 0,
            max_gap_bits: 1000,
        };
        let blocks = plan(&tags, l);
        assert_eq!(ranges(&blocks), [(0, 2000), (2000, 1)]);
    }

    #[test]
    fn gap_zero_merges_only_adjacent_tags() {
        let blocks = plan(&hr(&[(0, 2), (2, 1), (4, 1), (5, 4)]), limits(125, 0));
        assert_eq!(ranges(&blocks), [(0, 3), (4, 5)]);
    }

    #[test]
    fn overlapping_tags_extend_the_block() {
        let blocks = plan(&hr(&[(0, 4), (2, 1), (1, 4)]), limits(125, 0));
        assert_eq!(ranges(&blocks), [(0, 5)]);
        assert_eq!(
            blocks[0].slots,
            [slot(0, 0, 4), slot(2, 1, 4), slot(1, 2, 1)]
        );
    }

    #[test]
    fn bit_tags_of_a_register_are_read_in_the_block_of_its_other_tags() {
        // Two bit tags of hr:5 (width 1 at offset 5) beside u16 tags at hr:4 and hr:6.
        let blocks = plan(&hr(&[(4, 1), (5, 1), (5, 1), (6, 1)]), limits(125, 0));
        assert_eq!(ranges(&blocks), [(4, 3)]);
        assert_eq!(
            blocks[0].slots,
            [slot(0, 0, 1), slot(1, 1, 1), slot(2, 1, 1), slot(3, 2, 1)]
        );
    }

    #[test]
    fn oversized_tag_gets_its_own_untruncated_block() {
        let blocks = plan(&hr(&[(0, 1), (1, 10), (11, 1)]), limits(4, 10));
        assert_eq!(ranges(&blocks), [(0, 1), (1, 10), (11, 1)]);
        assert_eq!(blocks[1].slots, [slot(1, 0, 10)]);
    }

    #[test]
    fn tags_at_the_end_of_the_address_space_do_not_overflow() {
        let blocks = plan(
            &hr(&[(65530, 4), (65534, 4), (65535, 65535)]),
            limits(125, 0),
        );
        assert_eq!(ranges(&blocks), [(65530, 6)]);
        assert_eq!(
            blocks[0].slots,
            [slot(0, 0, 4), slot(1, 4, 2), slot(2, 5, 1)]
        );
        let blocks = plan(&hr(&[(0, u16::MAX), (1, u16::MAX)]), limits(125, 0));
        assert_eq!(ranges(&blocks), [(0, u16::MAX), (1, u16::MAX)]);
    }

    fn block(slots: &[(u32, u16, u16)]) -> Block {
        let slots: Vec<Slot> = slots.iter().map(|&(t, o, w)| slot(t, o, w)).collect();
        let count = slots.iter().map(slot_end).max().unwrap() as u16;
        Block {
            area: Area::HoldingRegister,
            start: 100,
            count,
            slots,
        }
    }

    #[test]
    fn split_at_the_largest_gap() {
        let b = block(&[(0, 0, 1), (1, 2, 1), (2, 10, 1), (3, 12, 1), (4, 15, 1)]);
        let (left, right) = b.split().unwrap();
        assert_eq!((left.start, left.count), (100, 3));
        assert_eq!(left.slots, [slot(0, 0, 1), slot(1, 2, 1)]);
        assert_eq!((right.start, right.count), (110, 6));
        assert_eq!(right.slots, [slot(2, 0, 1), slot(3, 2, 1), slot(4, 5, 1)]);
    }

    #[test]
    fn split_contiguous_tags_in_the_middle() {
        let b = block(&[(0, 0, 2), (1, 2, 2), (2, 4, 2), (3, 6, 2)]);
        let (left, right) = b.split().unwrap();
        assert_eq!((left.start, left.count), (100, 4));
        assert_eq!((right.start, right.count), (104, 4));
        assert_eq!(right.slots, [slot(2, 0, 2), slot(3, 2, 2)]);

        // The middle is counted in registers, not tags.
        let b = block(&[(0, 0, 4), (1, 4, 1), (2, 5, 1), (3, 6, 1), (4, 7, 1)]);
        let (left, right) = b.split().unwrap();
        assert_eq!((left.start, left.count, left.slots.len()), (100, 4, 1));
        assert_eq!((right.start, right.count, right.slots.len()), (104, 4, 4));
    }

    #[test]
    fn split_does_not_cut_through_overlapping_tags() {
        let b = block(&[(0, 0, 4), (1, 2, 4), (2, 6, 1), (3, 7, 1)]);
        let (left, right) = b.split().unwrap();
        assert_eq!(left.slots, [slot(0, 0, 4), slot(1, 2, 4)]);
        assert_eq!((left.start, left.count), (100, 6));
        assert_eq!((right.start, right.count), (106, 2));
        assert_eq!(left.split(), None);
    }

    #[test]
    fn unsplittable_blocks() {
        assert_eq!(block(&[(0, 0, 4)]).split(), None);
        assert_eq!(block(&[(0, 0, 2), (1, 0, 2)]).split(), None);
        assert_eq!(block(&[(0, 0, 4), (1, 1, 2), (2, 3, 4)]).split(), None);
        let empty = Block {
            area: Area::Coil,
            start: 0,
            count: 0,
            slots: Vec::new(),
        };
        assert_eq!(empty.split(), None);
    }

    #[test]
    fn repeated_split_reaches_single_tags() {
        // Disjoint tags, some adjacent, some with gaps.
        let tags: Vec<(u16, u16)> = (0..13).map(|i| (i * 4 + i % 2, 1 + i % 3)).collect();
        let blocks = plan(&hr(&tags), limits(125, 10));
        assert_eq!(blocks.len(), 1);
        let mut pending = blocks;
        let mut leaves = Vec::new();
        while let Some(b) = pending.pop() {
            match b.split() {
                Some((l, r)) => {
                    assert!(l.slots.len() + r.slots.len() == b.slots.len());
                    pending.push(l);
                    pending.push(r);
                }
                None => leaves.push(b),
            }
        }
        assert_eq!(leaves.len(), tags.len());
        for leaf in &leaves {
            assert_eq!(leaf.slots.len(), 1);
            let s = leaf.slots[0];
            let (offset, width) = tags[s.tag.0 as usize];
            assert_eq!((leaf.start, leaf.count), (offset, width));
            assert_eq!((s.offset, s.width), (0, width));
        }
    }

    fn any_tags() -> impl Strategy<Value = Vec<(TagId, Address, u16)>> {
        let offset = prop_oneof![4 => 0u16..400, 1 => 65_400u16..=u16::MAX];
        let width = prop_oneof![8 => 1u16..=8, 1 => 1u16..=300, 1 => Just(u16::MAX)];
        prop::collection::vec((0usize..4, offset, width), 0..60).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (a, o, w))| (TagId(i as u32), at(AREAS[a], o), w))
                .collect()
        })
    }

    fn any_limits() -> impl Strategy<Value = Limits> {
        (0u16..=125, 0u16..=2000, 0u16..=20, 0u16..=100).prop_map(|(r, b, gr, gb)| Limits {
            max_registers: r,
            max_bits: b,
            max_gap_registers: gr,
            max_gap_bits: gb,
        })
    }

    /// Tags that never share a register: per area, consecutive (gap, width) runs.
    fn disjoint_tags() -> impl Strategy<Value = Vec<(TagId, Address, u16)>> {
        prop::collection::vec((0usize..4, 0u16..12, 1u16..=10), 0..80).prop_map(|v| {
            let mut next = [0u16; 4];
            v.into_iter()
                .enumerate()
                .map(|(i, (a, gap, w))| {
                    let offset = next[a] + gap;
                    next[a] = offset + w;
                    (TagId(i as u32), at(AREAS[a], offset), w)
                })
                .collect()
        })
    }

    fn check_plan(tags: &[(TagId, Address, u16)], l: Limits, blocks: &[Block]) {
        let mut seen: Vec<u32> = blocks
            .iter()
            .flat_map(|b| b.slots.iter().map(|s| s.tag.0))
            .collect();
        seen.sort_unstable();
        let all: Vec<u32> = (0..tags.len() as u32).collect();
        assert_eq!(seen, all, "every tag exactly once");

        for b in blocks {
            let (max, _) = l.for_area(b.area);
            assert!(u32::from(b.start) + u32::from(b.count) <= SPACE);
            assert!(
                u32::from(b.count) <= max || b.slots.len() == 1,
                "over the limit: {b:?}"
            );
            assert!(!b.slots.is_empty());
            assert_eq!(b.slots.iter().map(|s| s.offset).min(), Some(0));
            assert_eq!(b.slots.iter().map(slot_end).max(), Some(u32::from(b.count)));
            for s in &b.slots {
                let (_, address, width) = tags[s.tag.0 as usize];
                assert_eq!(address.area, b.area);
                assert_eq!(
                    u32::from(b.start) + u32::from(s.offset),
                    u32::from(address.offset)
                );
                let fits = (SPACE - u32::from(address.offset)).min(width.into());
                assert_eq!(u32::from(s.width), fits);
                assert!(slot_end(s) <= u32::from(b.count));
            }
        }
        for pair in blocks.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            assert!((a.area, a.start) <= (b.area, b.start), "sorted");
            if a.area == b.area {
                // Greedy: b's first tag could not join a.
                let (max, gap) = l.for_area(a.area);
                let a_end = u32::from(a.start) + u32::from(a.count);
                let b_first = u32::from(b.start);
                let b_first_end = b
                    .slots
                    .iter()
                    .filter(|s| s.offset == 0)
                    .map(|s| b_first + u32::from(s.width))
                    .min()
                    .unwrap();
                assert!(
                    b_first.saturating_sub(a_end) > gap
                        || a_end.max(b_first_end) - u32::from(a.start) > max
                );
            }
        }
    }

    /// Whether some boundary separates the slots without sharing a register.
    fn has_cut(slots: &[Slot]) -> bool {
        let mut sorted = slots.to_vec();
        sorted.sort_by_key(|s| s.offset);
        let mut end = 0;
        sorted.windows(2).any(|w| {
            end = end.max(slot_end(&w[0]));
            u32::from(w[1].offset) >= end
        })
    }

    fn check_split(b: &Block) {
        match b.split() {
            None => assert!(b.slots.len() <= 1 || !has_cut(&b.slots)),
            Some((l, r)) => {
                assert!(!l.slots.is_empty() && !r.slots.is_empty());
                assert_eq!(l.slots.len() + r.slots.len(), b.slots.len());
                let l_end = u32::from(l.start) + u32::from(l.count);
                assert!(l_end <= u32::from(r.start), "halves share no register");
                assert!(l.start >= b.start);
                assert!(
                    u32::from(r.start) + u32::from(r.count)
                        <= u32::from(b.start) + u32::from(b.count)
                );
                for half in [&l, &r] {
                    assert_eq!(half.area, b.area);
                    assert_eq!(half.slots.iter().map(|s| s.offset).min(), Some(0));
                    assert_eq!(
                        half.slots.iter().map(slot_end).max(),
                        Some(u32::from(half.count))
                    );
                    for s in &half.slots {
                        let orig = b.slots.iter().find(|o| o.tag == s.tag).unwrap();
                        assert_eq!(s.width, orig.width);
                        assert_eq!(
                            u32::from(half.start) + u32::from(s.offset),
                            u32::from(b.start) + u32::from(orig.offset)
                        );
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        fn plans_cover_every_tag_within_limits(tags in any_tags(), l in any_limits()) {
            let blocks = plan(&tags, l);
            check_plan(&tags, l, &blocks);
            for b in &blocks {
                check_split(b);
            }
        }

        #[test]
        fn disjoint_tags_give_disjoint_blocks(tags in disjoint_tags(), l in any_limits()) {
            let blocks = plan(&tags, l);
            check_plan(&tags, l, &blocks);
            for pair in blocks.windows(2) {
                let (a, b) = (&pair[0], &pair[1]);
                if a.area == b.area {
                    prop_assert!(u32::from(a.start) + u32::from(a.count) <= u32::from(b.start));
                }
            }
            for b in &blocks {
                check_split(b);
                // Disjoint tags always split down to single tags.
                prop_assert_eq!(b.split().is_some(), b.slots.len() > 1);
            }
        }
    }
}

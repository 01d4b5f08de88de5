//! One test per SET_IRQS rule of the spec (and VFIO's INTx semantics).

use super::*;
use std::io::Read;

fn efd() -> OwnedFd {
    eventfd().unwrap()
}

/// Reads (and so clears) an eventfd's count; 0 if nothing was signalled.
fn count(fd: &OwnedFd) -> u64 {
    let mut b = [0u8; 8];
    match File::from(fd.try_clone().unwrap()).read(&mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        _ => 0,
    }
}

fn set(index: u32, start: u32, count: u32, action: IrqAction, data: IrqData) -> IrqSet {
    IrqSet {
        index,
        start,
        count,
        action,
        data,
    }
}

fn assign(t: &mut IrqTable, index: u32, start: u32, fds: &[&OwnedFd]) {
    let dup = fds
        .iter()
        .map(|f| f.try_clone().unwrap())
        .collect::<Vec<_>>();
    t.apply(set(
        index,
        start,
        fds.len() as u32,
        IrqAction::Trigger,
        IrqData::Eventfds(dup),
    ))
    .unwrap();
}

const MSIX: u32 = PCI_MSIX_IRQ_INDEX;

#[test]
fn trigger_eventfd_assigns_one_eventfd_per_vector() {
    let mut t = IrqTable::pci(1, 4);
    let f: Vec<_> = (0..4).map(|_| efd()).collect();
    assign(&mut t, MSIX, 0, &f.iter().collect::<Vec<_>>());
    t.fire(MSIX, 2);
    assert_eq!(f.iter().map(count).collect::<Vec<_>>(), vec![0, 0, 1, 0]);
}

#[test]
fn a_partial_range_leaves_other_vectors_alone() {
    let mut t = IrqTable::pci(1, 4);
    let (a, b) = (efd(), efd());
    assign(&mut t, MSIX, 0, &[&a]);
    assign(&mut t, MSIX, 2, &[&b]);
    t.fire(MSIX, 0);
    t.fire(MSIX, 2);
    assert_eq!((count(&a), count(&b)), (1, 1));
    assert!(!t.pending(MSIX, 1));
}

#[test]
fn trigger_eventfd_with_no_fds_deassigns_and_later_fires_are_pending() {
    let mut t = IrqTable::pci(1, 4);
    let a = efd();
    assign(&mut t, MSIX, 1, &[&a]);
    t.apply(set(
        MSIX,
        1,
        1,
        IrqAction::Trigger,
        IrqData::Eventfds(vec![]),
    ))
    .unwrap();
    t.fire(MSIX, 1);
    assert_eq!(count(&a), 0);
    assert!(t.pending(MSIX, 1));
}

#[test]
fn assigning_an_eventfd_delivers_what_was_pending() {
    let mut t = IrqTable::pci(1, 4);
    t.fire(MSIX, 3);
    let a = efd();
    assign(&mut t, MSIX, 3, &[&a]);
    assert_eq!(count(&a), 1);
    assert!(!t.pending(MSIX, 3));
}

#[test]
fn trigger_none_with_count_zero_disables_the_whole_index() {
    let mut t = IrqTable::pci(1, 4);
    let a = efd();
    assign(&mut t, MSIX, 0, &[&a]);
    t.apply(set(MSIX, 0, 1, IrqAction::Mask, IrqData::None))
        .unwrap();
    t.apply(set(MSIX, 0, 0, IrqAction::Trigger, IrqData::None))
        .unwrap();
    assert!(!t.enabled(MSIX));
    t.fire(MSIX, 0);
    assert_eq!(count(&a), 0, "de-assigned");
}

#[test]
fn trigger_none_fires_every_vector_of_the_range() {
    let mut t = IrqTable::pci(1, 4);
    let f: Vec<_> = (0..4).map(|_| efd()).collect();
    assign(&mut t, MSIX, 0, &f.iter().collect::<Vec<_>>());
    t.apply(set(MSIX, 1, 2, IrqAction::Trigger, IrqData::None))
        .unwrap();
    assert_eq!(f.iter().map(count).collect::<Vec<_>>(), vec![0, 1, 1, 0]);
}

#[test]
fn trigger_bool_fires_only_the_true_vectors() {
    let mut t = IrqTable::pci(1, 4);
    let f: Vec<_> = (0..4).map(|_| efd()).collect();
    assign(&mut t, MSIX, 0, &f.iter().collect::<Vec<_>>());
    t.apply(set(
        MSIX,
        0,
        4,
        IrqAction::Trigger,
        IrqData::Bool(vec![true, false, false, true]),
    ))
    .unwrap();
    assert_eq!(f.iter().map(count).collect::<Vec<_>>(), vec![1, 0, 0, 1]);
}

#[test]
fn mask_holds_a_fire_as_pending_and_unmask_delivers_it() {
    let mut t = IrqTable::pci(1, 4);
    let a = efd();
    assign(&mut t, MSIX, 0, &[&a]);
    t.apply(set(MSIX, 0, 1, IrqAction::Mask, IrqData::None))
        .unwrap();
    t.fire(MSIX, 0);
    assert_eq!(count(&a), 0);
    assert!(t.pending(MSIX, 0));
    t.apply(set(MSIX, 0, 1, IrqAction::Unmask, IrqData::None))
        .unwrap();
    assert_eq!(count(&a), 1);
    assert!(!t.pending(MSIX, 0));
}

#[test]
fn mask_and_unmask_with_bools_touch_only_the_true_vectors() {
    let mut t = IrqTable::pci(1, 4);
    let f: Vec<_> = (0..4).map(|_| efd()).collect();
    assign(&mut t, MSIX, 0, &f.iter().collect::<Vec<_>>());
    t.apply(set(
        MSIX,
        0,
        4,
        IrqAction::Mask,
        IrqData::Bool(vec![false, true, true, false]),
    ))
    .unwrap();
    for v in 0..4 {
        t.fire(MSIX, v);
    }
    assert_eq!(f.iter().map(count).collect::<Vec<_>>(), vec![1, 0, 0, 1]);
    t.apply(set(
        MSIX,
        0,
        4,
        IrqAction::Unmask,
        IrqData::Bool(vec![false, true, false, false]),
    ))
    .unwrap();
    assert_eq!(f.iter().map(count).collect::<Vec<_>>(), vec![0, 1, 0, 0]);
    assert!(t.pending(MSIX, 2));
}

#[test]
fn mask_on_an_index_that_is_not_maskable_is_an_error() {
    let mut t = IrqTable::pci(1, 4);
    assert!(t
        .apply(set(PCI_MSI_IRQ_INDEX, 0, 1, IrqAction::Mask, IrqData::None))
        .is_err());
}

#[test]
fn ranges_past_the_vectors_and_unknown_indexes_are_errors() {
    let mut t = IrqTable::pci(1, 4);
    assert!(t
        .apply(set(MSIX, 3, 2, IrqAction::Trigger, IrqData::None))
        .is_err());
    assert!(t
        .apply(set(7, 0, 1, IrqAction::Trigger, IrqData::None))
        .is_err());
}

#[test]
fn intx_is_level_triggered_and_automasked() {
    let mut t = IrqTable::pci(1, 4);
    let a = efd();
    assign(&mut t, PCI_INTX_IRQ_INDEX, 0, &[&a]);
    t.set_intx_level(true);
    assert_eq!(count(&a), 1);
    t.set_intx_level(true);
    assert_eq!(count(&a), 0, "no new edge, and automasked");
    t.apply(set(
        PCI_INTX_IRQ_INDEX,
        0,
        1,
        IrqAction::Unmask,
        IrqData::None,
    ))
    .unwrap();
    assert_eq!(count(&a), 1, "unmask while still asserted delivers again");
    t.set_intx_level(false);
    t.apply(set(
        PCI_INTX_IRQ_INDEX,
        0,
        1,
        IrqAction::Unmask,
        IrqData::None,
    ))
    .unwrap();
    assert_eq!(count(&a), 0, "deasserted: nothing to deliver");
    t.set_intx_level(true);
    assert_eq!(count(&a), 1);
}

#[test]
fn mask_and_unmask_eventfds_are_notified() {
    let mut t = IrqTable::pci(1, 4);
    let (trig, masked, unmasked) = (efd(), efd(), efd());
    assign(&mut t, PCI_INTX_IRQ_INDEX, 0, &[&trig]);
    t.apply(set(
        PCI_INTX_IRQ_INDEX,
        0,
        1,
        IrqAction::Mask,
        IrqData::Eventfds(vec![masked.try_clone().unwrap()]),
    ))
    .unwrap();
    t.apply(set(
        PCI_INTX_IRQ_INDEX,
        0,
        1,
        IrqAction::Unmask,
        IrqData::Eventfds(vec![unmasked.try_clone().unwrap()]),
    ))
    .unwrap();
    t.set_intx_level(true);
    assert_eq!(
        (count(&trig), count(&masked)),
        (1, 1),
        "automask notifies the mask eventfd"
    );
    t.set_intx_level(false);
    t.apply(set(
        PCI_INTX_IRQ_INDEX,
        0,
        1,
        IrqAction::Unmask,
        IrqData::None,
    ))
    .unwrap();
    assert_eq!(count(&unmasked), 1);
}

#[test]
fn clear_tears_everything_down() {
    let mut t = IrqTable::pci(1, 4);
    let a = efd();
    assign(&mut t, MSIX, 0, &[&a]);
    t.fire(MSIX, 1);
    t.clear();
    assert!(!t.enabled(MSIX));
    assert!(!t.pending(MSIX, 1));
    t.fire(MSIX, 0);
    assert_eq!(count(&a), 0);
    assert_eq!(t.mode(), IrqMode::Intx);
}

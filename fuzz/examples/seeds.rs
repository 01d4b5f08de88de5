//! Writes the seed corpus: fuzz/corpus/<target>/seed-<name>. Each seed is a
//! valid conversation (or message) the fuzzer starts mutating from.
//!
//!   cargo run --manifest-path fuzz/Cargo.toml --example seeds
//!
//! session_stream seeds are records `[tag u8][len u16 LE][bytes]` (see
//! fuzz_targets/session_stream.rs); protocol_decode seeds are single
//! messages (header + payload) and bare message bodies.

use std::path::Path;

use airlock::device::emulated::edu;
use airlock_protocol::device::{
    DeviceInfo, IrqInfo, RegionCap, RegionInfo, SparseArea, PCI_CONFIG_REGION_INDEX,
    PCI_MSIX_IRQ_INDEX,
};
use airlock_protocol::dma::{
    DmaAccess, DmaMap, DmaUnmap, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DMA_MAP_SIZE,
    DMA_UNMAP_FLAG_ALL, DMA_UNMAP_SIZE,
};
use airlock_protocol::dma_multi::{
    encode_map_multi, encode_unmap_multi, DmaMapEntry, DmaUnmapEntry, DMA_MULTI_NO_FD,
};
use airlock_protocol::header::{Command, Header, FLAG_TYPE_REPLY};
use airlock_protocol::irqs::{
    IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE,
};
use airlock_protocol::region::{encode_write_multi, RegionAccess, WriteOne};
use airlock_protocol::version::{Capabilities, Version};

// session_stream record tags (see the target).
const T_NONE: u8 = 0;
const T_MEMFD: u8 = 1;
const T_EVENTFD: u8 = 2;
const T_DEVNULL: u8 = 3;
const T_SOCKET: u8 = 4;
const T_TWO_EVENTFDS: u8 = 6;
const T_17_EVENTFDS: u8 = 7;
const MEMFD_4K: u8 = 1 << 3;
const MEMFD_2M: u8 = 3 << 3;
const SEALED: u8 = 0x20;

const BAR0: u32 = 0;
const RAM: u64 = 0x10_0000;

fn msg(id: u16, cmd: Command, payload: &[u8]) -> Vec<u8> {
    let mut v = Header::command(id, cmd, payload.len(), false)
        .encode()
        .to_vec();
    v.extend_from_slice(payload);
    v
}

fn posted(id: u16, cmd: Command, payload: &[u8]) -> Vec<u8> {
    let mut v = Header::command(id, cmd, payload.len(), true)
        .encode()
        .to_vec();
    v.extend_from_slice(payload);
    v
}

fn reply(id: u16, cmd: Command, payload: &[u8]) -> Vec<u8> {
    let h = Header {
        id,
        cmd: cmd as u16,
        size: (16 + payload.len()) as u32,
        flags: FLAG_TYPE_REPLY,
        error: 0,
    };
    let mut v = h.encode().to_vec();
    v.extend_from_slice(payload);
    v
}

fn version(write_multiple: bool) -> Vec<u8> {
    let caps = Capabilities {
        max_msg_fds: Some(16),
        max_data_xfer_size: Some(1 << 20),
        pgsizes: Some(4096),
        max_dma_maps: Some(65535),
        write_multiple: write_multiple.then_some(true),
        dma_multiple: write_multiple.then_some(true),
        ..Default::default()
    };
    msg(
        1,
        Command::Version,
        &Version {
            major: 0,
            minor: 0,
            capabilities: Some(caps),
        }
        .encode(),
    )
}

fn read(id: u16, region: u32, offset: u64, count: u32) -> Vec<u8> {
    let a = RegionAccess {
        offset,
        region,
        count,
    };
    msg(id, Command::RegionRead, &a.encode(&[]))
}

fn write(id: u16, region: u32, offset: u64, data: &[u8]) -> Vec<u8> {
    let a = RegionAccess {
        offset,
        region,
        count: data.len() as u32,
    };
    msg(id, Command::RegionWrite, &a.encode(data))
}

fn write64(id: u16, offset: u64, v: u64) -> Vec<u8> {
    write(id, BAR0, offset, &v.to_ne_bytes())
}

/// PCI command register: memory space + bus master.
fn bus_master(id: u16) -> Vec<u8> {
    write(id, PCI_CONFIG_REGION_INDEX, 4, &0x6u16.to_ne_bytes())
}

fn dma_map(id: u16, iova: u64, size: u64) -> Vec<u8> {
    let m = DmaMap {
        argsz: DMA_MAP_SIZE as u32,
        flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        offset: 0,
        iova,
        size,
    };
    msg(id, Command::DmaMap, &m.encode())
}

fn dma_unmap(id: u16, iova: u64, size: u64, flags: u32) -> Vec<u8> {
    let m = DmaUnmap {
        argsz: DMA_UNMAP_SIZE as u32,
        flags,
        iova,
        size,
    };
    msg(id, Command::DmaUnmap, &m.encode())
}

fn irq_set(flags: u32, index: u32, start: u32, count: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for w in [(20 + data.len()) as u32, flags, index, start, count] {
        v.extend_from_slice(&w.to_ne_bytes());
    }
    v.extend_from_slice(data);
    v
}

/// edu DMA: `cmd` 1 = RAM -> buffer, 3 = buffer -> RAM.
fn edu_dma(first_id: u16, src: u64, dst: u64, count: u64, cmd: u64) -> Vec<Vec<u8>> {
    vec![
        write64(first_id, edu::REG_DMA_SRC, src),
        write64(first_id + 1, edu::REG_DMA_DST, dst),
        write64(first_id + 2, edu::REG_DMA_COUNT, count),
        write64(first_id + 3, edu::REG_DMA_CMD, cmd),
    ]
}

fn records(recs: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (tag, bytes) in recs {
        out.push(*tag);
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

fn plain(msgs: Vec<Vec<u8>>) -> Vec<(u8, Vec<u8>)> {
    msgs.into_iter().map(|m| (T_NONE, m)).collect()
}

fn session_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = Vec::new();
    seeds.push(("version", records(&plain(vec![version(false)]))));
    seeds.push((
        "info",
        records(&plain(vec![
            version(false),
            msg(2, Command::DeviceGetInfo, &DeviceInfo::default().encode()),
            msg(
                3,
                Command::DeviceGetRegionInfo,
                &RegionInfo::encode_request(32, 0),
            ),
            msg(
                4,
                Command::DeviceGetRegionInfo,
                &RegionInfo::encode_request(256, 1),
            ),
            msg(
                5,
                Command::DeviceGetIrqInfo,
                &IrqInfo {
                    argsz: 16,
                    index: PCI_MSIX_IRQ_INDEX,
                    ..Default::default()
                }
                .encode(),
            ),
            read(6, BAR0, edu::REG_IDENT, 4),
            write(7, BAR0, edu::REG_LIVENESS, &0x1234_5678u32.to_ne_bytes()),
            read(8, BAR0, edu::REG_LIVENESS, 4),
            read(9, PCI_CONFIG_REGION_INDEX, 0, 256),
            msg(10, Command::DeviceReset, &[]),
        ])),
    ));
    seeds.push((
        "factorial",
        records(&plain(vec![
            version(false),
            write(2, BAR0, edu::REG_STATUS, &0x80u32.to_ne_bytes()),
            write(3, BAR0, edu::REG_FACTORIAL, &5u32.to_ne_bytes()),
            read(4, BAR0, edu::REG_FACTORIAL, 4),
            read(5, BAR0, edu::REG_IRQ_STATUS, 4),
            write(6, BAR0, edu::REG_IRQ_ACK, &1u32.to_ne_bytes()),
            posted(
                7,
                Command::RegionWrite,
                &RegionAccess {
                    offset: edu::REG_IRQ_RAISE,
                    region: BAR0,
                    count: 4,
                }
                .encode(&2u32.to_ne_bytes()),
            ),
        ])),
    ));
    // Device DMA through a memfd the client mapped (pread/pwrite path).
    let mut r = plain(vec![version(false), bus_master(2)]);
    r.push((T_MEMFD | MEMFD_4K | SEALED, dma_map(3, RAM, 4096)));
    r.extend(plain(edu_dma(4, RAM, edu::DMA_BUFFER, 64, 1)));
    r.extend(plain(edu_dma(8, RAM + 64, edu::DMA_BUFFER, 64, 3 | 4)));
    r.extend(plain(vec![
        read(12, BAR0, edu::DMA_BUFFER, 64),
        read(13, BAR0, edu::REG_DMA_ERROR, 4),
        dma_unmap(14, RAM, 4096, 0),
    ]));
    seeds.push(("dma-memfd", records(&r)));
    // Device DMA through DMA_READ / DMA_WRITE messages (no fd), answered.
    let mut msgs = vec![version(false), bus_master(2), dma_map(3, RAM, 4096)];
    msgs.extend(edu_dma(4, RAM, edu::DMA_BUFFER, 16, 1));
    let a = DmaAccess {
        iova: RAM,
        count: 16,
    };
    msgs.push(reply(
        1,
        Command::DmaRead,
        &a.encode_read_reply(&[0xab; 16]),
    ));
    msgs.extend(edu_dma(8, RAM, edu::DMA_BUFFER, 16, 3));
    msgs.push(reply(2, Command::DmaWrite, &[]));
    msgs.push(read(12, BAR0, edu::DMA_BUFFER, 16));
    msgs.push(dma_unmap(13, 0, 0, DMA_UNMAP_FLAG_ALL));
    seeds.push(("dma-messages", records(&plain(msgs))));
    // Two 2 MiB memfd maps, unmapped all at once; one with a short file.
    let mut r = plain(vec![version(false)]);
    r.push((T_MEMFD | MEMFD_2M, dma_map(2, RAM, 2 << 20)));
    r.push((T_MEMFD, dma_map(3, RAM + (4 << 20), 4096)));
    r.extend(plain(vec![
        bus_master(4),
        write64(5, edu::REG_DMA_SRC, RAM + (4 << 20)),
    ]));
    r.extend(plain(edu_dma(6, RAM + (4 << 20), edu::DMA_BUFFER, 8, 1)));
    r.push((T_NONE, dma_unmap(10, 0, 0, DMA_UNMAP_FLAG_ALL)));
    seeds.push(("dma-2m-and-short", records(&r)));
    // Interrupts: eventfds for MSI-X, raised, then de-assigned.
    let mut r = plain(vec![version(false)]);
    r.push((
        T_EVENTFD,
        msg(
            2,
            Command::DeviceSetIrqs,
            &irq_set(
                IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                PCI_MSIX_IRQ_INDEX,
                0,
                1,
                &[],
            ),
        ),
    ));
    r.push((
        T_TWO_EVENTFDS,
        msg(
            3,
            Command::DeviceSetIrqs,
            &irq_set(
                IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                PCI_MSIX_IRQ_INDEX,
                1,
                2,
                &[],
            ),
        ),
    ));
    r.extend(plain(vec![
        // MSI-X control (the capability after MSI at 0x40 and PCIe at
        // 0x50): enable.
        write(4, PCI_CONFIG_REGION_INDEX, 0x8e, &0x8000u16.to_ne_bytes()),
        write(5, BAR0, edu::REG_MSIX_RAISE, &1u32.to_ne_bytes()),
        msg(
            6,
            Command::DeviceSetIrqs,
            &irq_set(
                IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER,
                PCI_MSIX_IRQ_INDEX,
                0,
                2,
                &[1, 0],
            ),
        ),
        msg(
            7,
            Command::DeviceSetIrqs,
            &irq_set(
                IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER,
                PCI_MSIX_IRQ_INDEX,
                0,
                0,
                &[],
            ),
        ),
    ]));
    seeds.push(("irqs", records(&r)));
    // REGION_WRITE_MULTI (write_multiple proposed).
    let ones = [
        WriteOne {
            offset: edu::REG_LIVENESS,
            region: BAR0,
            count: 4,
            data: [1, 2, 3, 4, 0, 0, 0, 0],
        },
        WriteOne {
            offset: edu::REG_DMA_SRC,
            region: BAR0,
            count: 8,
            data: [0, 0, 0x10, 0, 0, 0, 0, 0],
        },
    ];
    seeds.push((
        "write-multi",
        records(&plain(vec![
            version(true),
            msg(2, Command::RegionWriteMulti, &encode_write_multi(&ones)),
            read(3, BAR0, edu::REG_LIVENESS, 4),
        ])),
    ));
    // DMA_MAP_MULTI / DMA_UNMAP_MULTI (dma_multiple proposed): two maps
    // into one memfd and one without fd, then both kinds of unmap.
    let entry = |iova, fd_index| DmaMapEntry {
        flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        fd_index,
        offset: 0,
        iova,
        size: 4096,
    };
    let maps = [
        entry(RAM, 0),
        entry(RAM + 0x10000, 0),
        entry(RAM + 0x20000, DMA_MULTI_NO_FD),
    ];
    let unmaps = maps.map(|m| DmaUnmapEntry {
        flags: 0,
        iova: m.iova,
        size: m.size,
    });
    let mut r = plain(vec![version(true)]);
    r.push((
        T_MEMFD,
        msg(2, Command::DmaMapMulti, &encode_map_multi(&maps)),
    ));
    r.push((
        T_NONE,
        msg(3, Command::DmaUnmapMulti, &encode_unmap_multi(&unmaps[..2])),
    ));
    r.push((
        T_NONE,
        msg(4, Command::DmaUnmapMulti, &encode_unmap_multi(&unmaps)),
    ));
    seeds.push(("dma-multi", records(&r)));
    // fds where they do not belong, and more than max_msg_fds.
    let mut r = plain(vec![version(false)]);
    r.push((T_DEVNULL, read(2, BAR0, 0, 4)));
    r.push((T_SOCKET, dma_map(3, RAM, 4096)));
    r.push((
        T_17_EVENTFDS,
        msg(
            4,
            Command::DeviceSetIrqs,
            &irq_set(
                IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                PCI_MSIX_IRQ_INDEX,
                0,
                4,
                &[],
            ),
        ),
    ));
    r.push((T_NONE, read(5, BAR0, 0, 4)));
    seeds.push(("stray-fds", records(&r)));
    // A header that cannot be framed (size 8): answered, then closed.
    let mut bad = Header::command(2, Command::RegionRead, 0, false);
    bad.size = 8;
    let mut r = plain(vec![version(false)]);
    r.push((T_NONE, bad.encode().to_vec()));
    seeds.push(("size-8", records(&r)));
    // A message split over several sendmsgs, and two in one.
    let v = version(false);
    let two = [read(2, BAR0, 0, 4), read(3, BAR0, 4, 4)].concat();
    seeds.push((
        "split",
        records(&[
            (T_NONE, v[..10].to_vec()),
            (T_NONE, v[10..].to_vec()),
            (T_NONE, two),
        ]),
    ));
    seeds
}

fn decode_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let a = DmaAccess {
        iova: RAM,
        count: 8,
    };
    let info = RegionInfo {
        argsz: 80,
        flags: 7,
        index: 0,
        cap_offset: 0,
        size: 1 << 20,
        offset: 0,
        caps: vec![
            RegionCap::SparseMmap(vec![SparseArea {
                offset: 0,
                size: 4096,
            }]),
            RegionCap::MsixMappable,
        ],
    };
    let mut bad = Header::command(2, Command::RegionRead, 0, false);
    bad.size = 8;
    vec![
        ("version", version(true)),
        ("dma-map", dma_map(2, RAM, 4096)),
        ("dma-unmap-all", dma_unmap(3, 0, 0, DMA_UNMAP_FLAG_ALL)),
        ("region-read", read(4, BAR0, 0, 4)),
        ("region-write", write(5, BAR0, 4, &[1, 2, 3, 4])),
        (
            "set-irqs",
            msg(
                6,
                Command::DeviceSetIrqs,
                &irq_set(
                    IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER,
                    PCI_MSIX_IRQ_INDEX,
                    0,
                    2,
                    &[1, 0],
                ),
            ),
        ),
        (
            "region-info",
            msg(
                7,
                Command::DeviceGetRegionInfo,
                &RegionInfo::encode_request(32, 0),
            ),
        ),
        (
            "dma-read-reply",
            reply(8, Command::DmaRead, &a.encode_read_reply(&[7; 8])),
        ),
        ("size-8", bad.encode().to_vec()),
        // Bare bodies (the whole input goes to every body decoder too).
        (
            "body-write-multi",
            encode_write_multi(&[WriteOne {
                offset: 4,
                region: 0,
                count: 4,
                data: [1; 8],
            }]),
        ),
        ("body-region-info-reply", info.encode_reply(4096)),
        ("body-dma-read-reply", a.encode_read_reply(&[9; 8])),
    ]
}

fn write_dir(dir: &Path, seeds: &[(&str, Vec<u8>)]) {
    std::fs::create_dir_all(dir).expect("corpus dir");
    for (name, bytes) in seeds {
        let p = dir.join(format!("seed-{name}"));
        std::fs::write(&p, bytes).expect("seed written");
        println!("{} ({} bytes)", p.display(), bytes.len());
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    write_dir(&root.join("session_stream"), &session_seeds());
    write_dir(&root.join("protocol_decode"), &decode_seeds());
}

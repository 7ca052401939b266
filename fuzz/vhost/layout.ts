/**
 * Where everything lives in the fuzz front-end's guest RAM. Every case gets a fresh front-end
 * (tests/helpers/vhost_frontend.ts) built with the same options, and the recorded handshakes come
 * from front-ends built the same way, so rings, slots and scratch areas sit at the same guest
 * addresses in all of them: a recorded SET_VRING_ADDR names the rings of whichever front-end
 * replays it. RAM is two regions (GPA 0 and GPA 4 GiB, one memfd) so descriptors can point into
 * the gap, across a region's end or above 4 GiB.
 * @module
 */
import type { FrontendOptions, VhostUserFrontend } from "../../tests/helpers/vhost_frontend.ts";
import { type RamRegion, UADDR_BASE } from "../../tests/helpers/virtio_ring.ts";

/** The device a fuzz run drives. */
export type FuzzDevice = "blk" | "rng";

/** Ring size of the fuzz front-end's queues (the rings are laid out for this many entries). */
export const QUEUE_SIZE = 256;
/** Guest RAM (two regions of 8 MiB). */
export const RAM_SIZE = 16 << 20;
/** Offset in each region where the "split table" change cuts it (nothing straddles it). */
export const SPLIT_AT = 6 << 20;
/** Size of the region hot-added with ADD_MEM_REG. */
export const HOT_SIZE = 2 << 20;
/** Data bytes per request slot of the well-behaved requests. */
export const SLOT_BYTES = 16 << 10;
/** Disk size the runner gives `mpq vhost blk`. */
export const DISK_SIZE = 8 << 20;

/** One ring: guest-physical addresses of its three areas and the front-end addresses sent for them. */
export interface RingLayout {
  desc: number;
  avail: number;
  used: number;
  descUaddr: number;
  availUaddr: number;
  usedUaddr: number;
}

/** Everything the plans need to know about guest memory (plain data, printable). */
export interface Layout {
  device: FuzzDevice;
  queues: number;
  queueSize: number;
  ramSize: number;
  regions: readonly RamRegion[];
  rings: readonly RingLayout[];
  /** Scratch for request headers, data and indirect tables of ring states, in region 0. */
  scratch: { gpa: number; size: number };
  /** A smaller scratch area in region 1 (above 4 GiB). */
  scratchHigh: { gpa: number; size: number };
  /** 32 control blocks of 64 bytes (header + status) for requests with data in the hot region. */
  ctl: number;
  /** Where ADD_MEM_REG puts the hot-added region. */
  hot: { gpa: number; uaddr: number; size: number };
  /** Bytes of the inflight area for all queues at QUEUE_SIZE (vhost-user.rst "Inflight I/O tracking"). */
  inflightSize: number;
  /** Disk size in 512-byte sectors (blk). */
  diskSectors: number;
}

/** Queues the fuzz front-end drives (the blk daemon is started with this many). */
export function queuesFor(device: FuzzDevice): number {
  return device === "blk" ? 2 : 1;
}

/** Front-end options every fuzz and recording front-end shares (the layout depends only on these). */
export function frontendOptions(device: FuzzDevice, timeoutMs: number): FrontendOptions {
  return {
    device,
    queues: queuesFor(device),
    queueSize: QUEUE_SIZE,
    memSize: RAM_SIZE,
    splitMemory: true,
    maxRequestBytes: SLOT_BYTES,
    timeoutMs,
  };
}

function inflightQueueBytes(queueSize: number): number {
  return Math.ceil((16 + 16 * queueSize) / 64) * 64;
}

/**
 * Allocates the fuzz areas in a freshly built front-end's RAM and returns the layout. Call it
 * exactly once per front-end, right after it is built, so every front-end gets the same layout.
 * @example
 * const fe = await VhostUserFrontend.connect(path, frontendOptions("blk", 5000));
 * const layout = allocateLayout(fe, "blk");
 */
export function allocateLayout(fe: VhostUserFrontend, device: FuzzDevice): Layout {
  const ram = fe.ram;
  const scratch = { gpa: ram.alloc(1 << 20, 4096, 0), size: 1 << 20 };
  const scratchHigh = { gpa: ram.alloc(256 << 10, 4096, 1), size: 256 << 10 };
  const ctl = ram.alloc(64 * 32, 64, 0);
  const rings = fe.queues.map((q) => ({
    desc: q.ring.descGpa,
    avail: q.ring.availGpa,
    used: q.ring.usedGpa,
    descUaddr: ram.uaddr(q.ring.descGpa),
    availUaddr: ram.uaddr(q.ring.availGpa),
    usedUaddr: ram.uaddr(q.ring.usedGpa),
  }));
  return {
    device,
    queues: fe.queues.length,
    queueSize: fe.options.queueSize,
    ramSize: ram.size,
    regions: ram.regions.map((r) => ({ ...r })),
    rings,
    scratch,
    scratchHigh,
    ctl,
    hot: { gpa: 0x2_0000_0000, uaddr: UADDR_BASE + 0x2_0000_0000, size: HOT_SIZE },
    inflightSize: fe.queues.length * inflightQueueBytes(fe.options.queueSize),
    diskSectors: DISK_SIZE / 512,
  };
}

/** Whether two layouts are the same (a front-end that lays its RAM out differently cannot replay). */
export function sameLayout(a: Layout, b: Layout): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

/** Every device the fuzzer knows. */
export const FUZZ_DEVICES: readonly FuzzDevice[] = ["blk", "rng"];

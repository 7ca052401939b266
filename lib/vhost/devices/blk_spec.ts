/**
 * virtio-blk as the virtio 1.2 spec (§5.2) defines it: feature bits, request types, status values,
 * config-space layout and the limits this back-end offers.
 * @module
 */

/** virtio-blk feature bits. */
export const BlkFeature = {
  SIZE_MAX: 1,
  SEG_MAX: 2,
  GEOMETRY: 4,
  RO: 5,
  BLK_SIZE: 6,
  FLUSH: 9,
  TOPOLOGY: 10,
  CONFIG_WCE: 11,
  MQ: 12,
  DISCARD: 13,
  WRITE_ZEROES: 14,
} as const;

/** Request types. */
export const BlkType = { IN: 0, OUT: 1, FLUSH: 4, GET_ID: 8, DISCARD: 11, WRITE_ZEROES: 13 } as const;
/** Status values. */
export const BlkStatus = { OK: 0, IOERR: 1, UNSUPP: 2 } as const;

/** Config space offsets (struct virtio_blk_config). */
export const BlkConfig = {
  capacity: 0,
  size_max: 8,
  seg_max: 12,
  blk_size: 20,
  physical_block_exp: 24,
  min_io_size: 26,
  opt_io_size: 28,
  writeback: 32,
  num_queues: 34,
  max_discard_sectors: 36,
  max_discard_seg: 40,
  discard_sector_alignment: 44,
  max_write_zeroes_sectors: 48,
  max_write_zeroes_seg: 52,
  write_zeroes_may_unmap: 56,
  size: 60,
} as const;

/** Data segments one request may carry (config seg_max). */
export const SEG_MAX = 126;
/** Largest discard / write-zeroes request in sectors. */
export const MAX_DISCARD_SECTORS = 0x3fffff;
/** Bytes per sector (request offsets and capacity are in sectors). */
export const SECTOR = 512;
/** GET_ID answers this many bytes. */
export const ID_BYTES = 20;
/** Ranges one DISCARD / WRITE_ZEROES request may carry (we offer 1; accept up to this many). */
export const MAX_DWZ_SEGS = 16;
/** The request header: type (u32), reserved (u32), sector (u64). */
export const HEADER_BYTES = 16;

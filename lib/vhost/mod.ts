/**
 * `mpq vhost`: vhost-user back-end daemons (blk, rng) and the protocol engine they run on.
 * @module
 */
export { main, USAGE } from "./cli.ts";
export { type DaemonOptions, VhostUserDaemon } from "./daemon.ts";
export { type DeviceContext, type VhostUserDevice } from "./backend.ts";
export { type HandlerOptions, type Message, type Outcome, VhostUserHandler } from "./handler.ts";
export { type ConnectionOptions, VhostUserConnection } from "./connection.ts";
export { GuestMemory, GuestMemoryError, GuestRegion, type Translation } from "./guest_memory.ts";
export { DescFlags, DescriptorChain, MAX_QUEUE_SIZE, VirtQueue, VirtqueueError } from "./virtqueue.ts";
export { inflightAreaSize, InflightQueue, inflightQueueSize } from "./inflight.ts";
export { LATENCY_BOUNDS_US, Metrics, MetricsServer, QueueMetrics } from "./metrics.ts";
export { BlkDevice, type BlkOptions, BlkStatus, BlkType, openBlkFile } from "./devices/blk.ts";
export { ENGINE_KINDS, type EngineChoice, type EngineKind, parseEngineChoice } from "./devices/blk_engine.ts";
export { createEngine, resolveEngine } from "./devices/blk_engines.ts";
export { RngDevice } from "./devices/rng.ts";
export * from "./message.ts";

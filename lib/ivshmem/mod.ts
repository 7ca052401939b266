/**
 * `mpq ivshmem`: a drop-in replacement for QEMU's contrib ivshmem-server, and a client.
 * @module
 */
export { main, parseServerArgs, SERVER_USAGE, type ServerArgs } from "./cli.ts";
export { CLIENT_USAGE, clientMain, parseClientArgs, TIMEOUT_EXIT } from "./client_cli.ts";
export { type ClientOptions, IvshmemClient, type IvshmemEvent } from "./client.ts";
export {
  IvshmemServer,
  openSharedMemory,
  PeerFailure,
  type ServerOptions,
  type ServerStats,
  type SharedMemory,
  ShmSizeMismatchError,
  type ShmSource,
} from "./server.ts";
export * from "./protocol.ts";

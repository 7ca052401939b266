/**
 * The safe libc API: the only way the rest of mpq reaches the kernel.
 * No pointer and no raw fd number leaves this folder except through `unsafe…` names.
 * @module
 */
export { Errno, ErrnoError, errnoName } from "./errno.ts";
export { fdKind, listOpenFds, OpenFlags, openPath, OwnedFd, ownedFdCount, pipe } from "./fd.ts";
export {
  adoptListener,
  bindDatagram,
  connectUnix,
  DatagramSocket,
  type ListenOptions,
  listenUnix,
  MAX_FDS_PER_MESSAGE,
  type Received,
  sendDatagram,
  type SocketOptions,
  socketPair,
  UnixListener,
  UnixSocket,
  unlinkPath,
} from "./socket.ts";
export {
  fstat,
  ftruncate,
  type MapOptions,
  MappedRegion,
  mapShared,
  memfdCreate,
  mkstempIn,
  sealedAgainstShrink,
  sealSize,
  ShmFlags,
  shmOpen,
  shmUnlink,
} from "./memory.ts";
export { EventFd } from "./eventfd.ts";
export { isListeningSocket } from "./sockopt.ts";
export { IOV_MAX, IoVecs } from "./iovec.ts";
export { isDirectIo, probeVmCopy, type VmCopyProbe, vmCopySelf, vmReadSelf, vmWriteSelf } from "./vmcopy.ts";
export { CopyHelper } from "./copy_helper.ts";
export {
  type CompletionHandler,
  IoUring,
  type IoUringOptions,
  type IoUringProbe,
  probeIoUring,
  supportsNowait,
} from "./io_uring.ts";
export {
  dataExtents,
  deviceSize,
  fdatasync,
  fileSystemType,
  preadv,
  punchHole,
  pwritev,
  TMPFS_MAGIC,
  zeroRange,
} from "./file.ts";
export {
  type Interest,
  Reactor,
  type ReactorOptions,
  type ReactorSignal,
  type Readiness,
  type Watch,
} from "./epoll.ts";
export {
  execve,
  getpid,
  getppid,
  getRandom,
  kill,
  raiseNoFileLimit,
  setParentDeathSignal,
  setsid,
  Signal,
  signalName,
} from "./process.ts";
export { ChildProcess, type ExitStatus, resolveExecutable, spawn, type SpawnOptions } from "./spawn.ts";

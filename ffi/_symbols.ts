/**
 * The one libc symbol table. Each entry carries its C prototype.
 * `size_t`/`ssize_t`/`off_t`/`long` are usize/isize/i64, never i32.
 * Private to ffi/: nothing outside this folder imports it.
 * @module
 */

export const SYMBOLS = {
  // int *__errno_location(void);
  __errno_location: { parameters: [], result: "pointer" },
  // int close(int fd);
  close: { parameters: ["i32"], result: "i32" },
  // ssize_t read(int fd, void *buf, size_t count);
  read: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  // ssize_t write(int fd, const void *buf, size_t count);
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  // ssize_t pread(int fd, void *buf, size_t count, off_t offset);
  pread: { parameters: ["i32", "pointer", "usize", "i64"], result: "isize" },
  // ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset);
  pwrite: { parameters: ["i32", "pointer", "usize", "i64"], result: "isize" },
  // ssize_t preadv(int fd, const struct iovec *iov, int iovcnt, off_t offset);
  preadv: { parameters: ["i32", "buffer", "i32", "i64"], result: "isize" },
  // ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t offset);
  pwritev: { parameters: ["i32", "buffer", "i32", "i64"], result: "isize" },
  // int open(const char *path, int flags, mode_t mode);
  open: { parameters: ["buffer", "i32", "u32"], result: "i32" },
  // off_t lseek(int fd, off_t offset, int whence);
  lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
  // int fcntl(int fd, int cmd, int arg);   (variadic; int arg on x86_64 SysV)
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
  // int ioctl(int fd, unsigned long request, void *argp);
  ioctl: { parameters: ["i32", "u64", "buffer"], result: "i32" },
  // int dup3(int oldfd, int newfd, int flags);
  dup3: { parameters: ["i32", "i32", "i32"], result: "i32" },
  // int pipe2(int pipefd[2], int flags);
  pipe2: { parameters: ["buffer", "i32"], result: "i32" },
  // int fsync(int fd);
  fsync: { parameters: ["i32"], result: "i32" },
  // int fdatasync(int fd);
  fdatasync: { parameters: ["i32"], result: "i32" },
  // int fallocate(int fd, int mode, off_t offset, off_t len);
  fallocate: { parameters: ["i32", "i32", "i64", "i64"], result: "i32" },
  // int ftruncate(int fd, off_t length);
  ftruncate: { parameters: ["i32", "i64"], result: "i32" },
  // int fstatfs(int fd, struct statfs *buf);
  fstatfs: { parameters: ["i32", "buffer"], result: "i32" },
  // int fstat(int fd, struct stat *statbuf);
  fstat: { parameters: ["i32", "buffer"], result: "i32" },
  // int fchmod(int fd, mode_t mode);
  fchmod: { parameters: ["i32", "u32"], result: "i32" },
  // int chmod(const char *path, mode_t mode);
  chmod: { parameters: ["buffer", "u32"], result: "i32" },
  // int unlink(const char *path);
  unlink: { parameters: ["buffer"], result: "i32" },

  // int socket(int domain, int type, int protocol);
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  // int socketpair(int domain, int type, int protocol, int sv[2]);
  socketpair: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  // int bind(int fd, const struct sockaddr *addr, socklen_t len);
  bind: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  // int listen(int fd, int backlog);
  listen: { parameters: ["i32", "i32"], result: "i32" },
  // int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags);
  accept4: { parameters: ["i32", "pointer", "pointer", "i32"], result: "i32" },
  // int connect(int fd, const struct sockaddr *addr, socklen_t len);
  connect: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  // ssize_t sendmsg(int fd, const struct msghdr *msg, int flags);
  sendmsg: { parameters: ["i32", "buffer", "i32"], result: "isize" },
  // ssize_t recvmsg(int fd, struct msghdr *msg, int flags);
  recvmsg: { parameters: ["i32", "buffer", "i32"], result: "isize" },
  // int shutdown(int fd, int how);
  shutdown: { parameters: ["i32", "i32"], result: "i32" },
  // int getsockopt(int fd, int level, int name, void *val, socklen_t *len);
  getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" },
  // int setsockopt(int fd, int level, int name, const void *val, socklen_t len);
  setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" },

  // int memfd_create(const char *name, unsigned int flags);
  memfd_create: { parameters: ["buffer", "u32"], result: "i32" },
  // int shm_open(const char *name, int oflag, mode_t mode);
  shm_open: { parameters: ["buffer", "i32", "u32"], result: "i32" },
  // int shm_unlink(const char *name);
  shm_unlink: { parameters: ["buffer"], result: "i32" },
  // int mkostemp(char *template, int flags);
  mkostemp: { parameters: ["buffer", "i32"], result: "i32" },
  // void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off);
  mmap: { parameters: ["pointer", "usize", "i32", "i32", "i32", "i64"], result: "pointer" },
  // int munmap(void *addr, size_t len);
  munmap: { parameters: ["pointer", "usize"], result: "i32" },

  // int eventfd(unsigned int initval, int flags);
  eventfd: { parameters: ["u32", "i32"], result: "i32" },
  // int epoll_create1(int flags);
  epoll_create1: { parameters: ["i32"], result: "i32" },
  // int epoll_ctl(int epfd, int op, int fd, struct epoll_event *event);
  epoll_ctl: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  // int epoll_wait(int epfd, struct epoll_event *events, int maxevents, int timeout);  (blocks this thread)
  epoll_wait: { parameters: ["i32", "buffer", "i32", "i32"], result: "i32" },
  // the same, run on a worker thread so the event loop keeps turning (errno is lost there)
  epoll_wait_nb: {
    name: "epoll_wait",
    parameters: ["i32", "buffer", "i32", "i32"],
    result: "i32",
    nonblocking: true,
  },

  // int getrlimit(int resource, struct rlimit *rlim);
  getrlimit: { parameters: ["i32", "buffer"], result: "i32" },
  // int setrlimit(int resource, const struct rlimit *rlim);
  setrlimit: { parameters: ["i32", "buffer"], result: "i32" },
  // pid_t getpid(void);
  getpid: { parameters: [], result: "i32" },
  // ssize_t process_vm_readv(pid_t pid, const struct iovec *local_iov, unsigned long liovcnt,
  //                          const struct iovec *remote_iov, unsigned long riovcnt, unsigned long flags);
  process_vm_readv: { parameters: ["i32", "buffer", "usize", "buffer", "usize", "usize"], result: "isize" },
  // ssize_t process_vm_writev(pid_t pid, const struct iovec *local_iov, unsigned long liovcnt,
  //                           const struct iovec *remote_iov, unsigned long riovcnt, unsigned long flags);
  process_vm_writev: { parameters: ["i32", "buffer", "usize", "buffer", "usize", "usize"], result: "isize" },
  // pid_t getppid(void);
  getppid: { parameters: [], result: "i32" },
  // pid_t setsid(void);
  setsid: { parameters: [], result: "i32" },
  // int kill(pid_t pid, int sig);
  kill: { parameters: ["i32", "i32"], result: "i32" },
  // int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5);
  prctl: { parameters: ["i32", "u64", "u64", "u64", "u64"], result: "i32" },
  // int execve(const char *path, char *const argv[], char *const envp[]);
  execve: { parameters: ["buffer", "buffer", "buffer"], result: "i32" },
  // int waitid(idtype_t idtype, id_t id, siginfo_t *infop, int options);
  waitid: { parameters: ["i32", "u32", "buffer", "i32"], result: "i32" },
  // the same on a worker thread: waits for a child without blocking the event loop
  waitid_nb: {
    name: "waitid",
    parameters: ["i32", "u32", "buffer", "i32"],
    result: "i32",
    nonblocking: true,
  },
  // long syscall(long number, ...);  (six long arguments on x86_64 SysV)
  syscall: { parameters: ["i64", "i64", "i64", "i64", "i64", "i64", "i64"], result: "i64" },
  // the same on a worker thread, for calls that block (io_uring_enter with min_complete)
  syscall_nb: {
    name: "syscall",
    parameters: ["i64", "i64", "i64", "i64", "i64", "i64", "i64"],
    result: "i64",
    nonblocking: true,
  },
  // ssize_t getrandom(void *buf, size_t len, unsigned int flags);
  getrandom: { parameters: ["pointer", "usize", "u32"], result: "isize" },

  // int posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
  //                 const posix_spawnattr_t *attr, char *const argv[], char *const envp[]);
  posix_spawn: {
    parameters: ["buffer", "buffer", "buffer", "buffer", "buffer", "buffer"],
    result: "i32",
  },
  // int posix_spawn_file_actions_init(posix_spawn_file_actions_t *fa);
  posix_spawn_file_actions_init: { parameters: ["buffer"], result: "i32" },
  // int posix_spawn_file_actions_destroy(posix_spawn_file_actions_t *fa);
  posix_spawn_file_actions_destroy: { parameters: ["buffer"], result: "i32" },
  // int posix_spawn_file_actions_adddup2(posix_spawn_file_actions_t *fa, int fd, int newfd);
  posix_spawn_file_actions_adddup2: { parameters: ["buffer", "i32", "i32"], result: "i32" },
  // int posix_spawn_file_actions_addopen(fa, int fd, const char *path, int oflag, mode_t mode);
  posix_spawn_file_actions_addopen: {
    parameters: ["buffer", "i32", "buffer", "i32", "u32"],
    result: "i32",
  },
  // int posix_spawn_file_actions_addclosefrom_np(posix_spawn_file_actions_t *fa, int from);
  posix_spawn_file_actions_addclosefrom_np: { parameters: ["buffer", "i32"], result: "i32" },
  // int posix_spawn_file_actions_addclose(posix_spawn_file_actions_t *fa, int fd);
  posix_spawn_file_actions_addclose: { parameters: ["buffer", "i32"], result: "i32" },
  // int posix_spawn_file_actions_addchdir_np(posix_spawn_file_actions_t *fa, const char *path);
  posix_spawn_file_actions_addchdir_np: { parameters: ["buffer", "buffer"], result: "i32" },
  // int posix_spawnattr_init(posix_spawnattr_t *attr);
  posix_spawnattr_init: { parameters: ["buffer"], result: "i32" },
  // int posix_spawnattr_destroy(posix_spawnattr_t *attr);
  posix_spawnattr_destroy: { parameters: ["buffer"], result: "i32" },
  // int posix_spawnattr_setflags(posix_spawnattr_t *attr, short flags);
  posix_spawnattr_setflags: { parameters: ["buffer", "i16"], result: "i32" },
  // int posix_spawnattr_setsigmask(posix_spawnattr_t *attr, const sigset_t *mask);
  posix_spawnattr_setsigmask: { parameters: ["buffer", "buffer"], result: "i32" },
  // int posix_spawnattr_setsigdefault(posix_spawnattr_t *attr, const sigset_t *set);
  posix_spawnattr_setsigdefault: { parameters: ["buffer", "buffer"], result: "i32" },
  // int posix_spawnattr_setpgroup(posix_spawnattr_t *attr, pid_t pgroup);
  posix_spawnattr_setpgroup: { parameters: ["buffer", "i32"], result: "i32" },
  // int sigemptyset(sigset_t *set);
  sigemptyset: { parameters: ["buffer"], result: "i32" },
  // int sigfillset(sigset_t *set);
  sigfillset: { parameters: ["buffer"], result: "i32" },
} as const satisfies Deno.ForeignLibraryInterface;

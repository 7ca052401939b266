# One VM as a Nomad job: the raw_exec driver runs `mpq orchestrate` on a host that has QEMU, mpq
# and the VM's disk (shared storage if the VM may move). Nomad restarts the task when mpq exits
# non-zero; `mpq orchestrate` itself tears the whole VM down in order on SIGTERM (kill_signal) and
# restarts vhost-user-blk back-ends that fail when the topology says "restart": "on-failure".
# To move the VM between hosts: run the same topology on the destination with --incoming, then
# `mpq ctl <control socket> migrate tcp:<destination>:<port>` on the source (see README).
job "vm-web1" {
  datacenters = ["dc1"]
  type        = "service"

  group "vm" {
    count = 1

    restart {
      attempts = 3
      interval = "10m"
      delay    = "5s"
      mode     = "fail"
    }

    task "mpq" {
      driver = "raw_exec"

      config {
        command = "/usr/bin/mpq"
        args    = ["orchestrate", "/etc/mpq/web1.json"]
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      resources {
        cpu    = 2000 # MHz
        memory = 1200 # MiB: guest RAM + QEMU + mpq
      }
    }
  }
}

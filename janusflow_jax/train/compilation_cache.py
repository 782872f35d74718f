"""The persistent compilation cache: a relaunch (after a preemption, on the same slice) loads every program it
compiled before instead of compiling it again (the 1.3B stage-2 step: minutes per composition on a pod host).

`config.compilation_cache`: "" (default) `<workdir>/compilation_cache`, a path (local or gs://; every host reads it,
jax writes new entries from one process), or "off". A cache directory jax already has (JAX_COMPILATION_CACHE_DIR,
--jax_compilation_cache_dir) is kept. Every program is cached, however quick its compile (jax's default skips those
under a second, which a relaunch would then compile again). `Counter` counts what the cache served and what was
compiled, for the goodput log.

On CPUs (the multi-process tests, a pod rehearsed on one machine) jax keys a program by the topology as each process
sees it, which differs between processes: a host other than process 0 never found the entries process 0 writes and
compiled every program at every launch while process 0 waited for it (measured: a 2-process stage2:tiny relaunch,
13 programs loaded on process 0, 47 s of its 65 s "compile" spent waiting for process 1's compiles).
`same_cpu_key_on_every_process` (called by `hosts.initialize`, so for every multi-process command) keys CPU programs
by the devices' kind instead, as jax does on platforms without a topology description; the device
assignment stays in the key through the compile options. TPU and GPU keys are left as jax makes them.
"""

from __future__ import annotations

import jax
from etils import epath

from janusflow_jax import paths


def enable(config, workdir) -> str | None:
    """Points jax at the run's cache (before the first compile of the run); returns the directory in use (None:
    off)."""
    setting = config.get("compilation_cache", "")
    current = jax.config.jax_compilation_cache_dir
    if setting == "off":
        return current
    if not current:
        directory = paths.user_path(setting) if setting else epath.Path(workdir) / "compilation_cache"
        if not paths.is_remote(directory):
            directory.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(directory))
        current = str(directory)
    if jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:  # jax's default: left alone if set
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return current


def same_cpu_key_on_every_process() -> None:
    """Keys programs for CPU devices by their kind, not by this process's view of the topology (module docstring)."""
    from jax._src import cache_key

    hash_config = cache_key._hash_accelerator_config
    if getattr(hash_config, "janusflow_cpu_by_kind", False):
        return

    def hash_accelerators(hash_obj, accelerators):
        if all(d.platform == "cpu" for d in accelerators.flat):
            return cache_key._hash_devices(hash_obj, accelerators)
        return hash_config(hash_obj, accelerators)

    hash_accelerators.janusflow_cpu_by_kind = True
    cache_key._hash_accelerator_config = hash_accelerators


class Counter:
    """Programs compiled with the cache on since `start()`: `hits` loaded from the cache, `misses` compiled."""

    _REQUESTS, _HITS = "/jax/compilation_cache/compile_requests_use_cache", "/jax/compilation_cache/cache_hits"

    def __init__(self):
        self.requests = self.hits = 0
        self._listening = False

    def _event(self, name: str, **_):
        if name == self._REQUESTS:
            self.requests += 1
        elif name == self._HITS:
            self.hits += 1

    def start(self):
        from jax._src import monitoring  # jax.monitoring lacks the unregister call

        if not self._listening:
            monitoring.register_event_listener(self._event)
            self._listening = True
        return self

    def stop(self):
        from jax._src import monitoring

        if self._listening:
            monitoring.unregister_event_listener(self._event)
            self._listening = False

    @property
    def misses(self) -> int:
        return self.requests - self.hits

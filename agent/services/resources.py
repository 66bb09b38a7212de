"""The resources being served: the config in force, and VFs a reload moved while a pod holds them."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.config import Config, ResourceConfig


@dataclass
class ResourceSet:
    config: Config
    pinned: dict[str, tuple[str, str]] = field(default_factory=dict)  # VF -> (old resource, its PF)
    retired: dict[str, ResourceConfig] = field(default_factory=dict)  # removed, still serving a pinned VF
    moved_from: Config | None = None  # the config before a reload not yet applied by a rescan

    def set_config(self, new: Config) -> None:
        """Adopt a reloaded config; the next rescan (whoever asks for it) applies it: new resources
        get a plugin server, removed ones lose theirs, PFs move between resources. Resources that
        did not change keep their sockets, streams and registrations; a VF a pod holds stays where
        it was until released."""
        if self.moved_from is None:
            self.moved_from = self.config
        self.config = new

    def served(self) -> list[ResourceConfig]:
        """The configured resources and removed ones still serving a VF a pod holds."""
        return [*self.config.resources, *self.retired.values()]

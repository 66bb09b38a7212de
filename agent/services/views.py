"""The device lists the kubelet sees: the latest view per resource, versioned for ListAndWatch."""

from __future__ import annotations

import asyncio

from agent.model import ResourceView


class ViewHub:
    """The latest ResourceView per resource, with a version that ListAndWatch streams wait on."""

    def __init__(self) -> None:
        self.views: dict[str, ResourceView] = {}
        self.versions: dict[str, int] = {}
        self._cond = asyncio.Condition()

    def current(self, resource: str) -> tuple[int, ResourceView]:
        return self.versions.get(resource, 0), self.views.get(resource, ResourceView(resource))

    async def publish(self, view: ResourceView) -> bool:
        """Store a view; wake watchers only if it differs from the last one."""
        if self.views.get(view.resource_name) == view:
            return False
        self.views[view.resource_name] = view
        self.versions[view.resource_name] = self.versions.get(view.resource_name, 0) + 1
        async with self._cond:
            self._cond.notify_all()
        return True

    async def changed(self, resource: str, after: int) -> tuple[int, ResourceView]:
        async with self._cond:
            await self._cond.wait_for(lambda: self.versions.get(resource, 0) != after)
        return self.current(resource)

    def drop(self, resource: str) -> None:
        """A resource no longer served: its view goes (a new server for it starts from nothing)."""
        self.views.pop(resource, None)

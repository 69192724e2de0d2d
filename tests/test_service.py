"""Tests for tend.service: the service tree, its start and stop order, and its misuses."""

from __future__ import annotations

import asyncio
import logging

import pytest
from conftest import wait_until_async

from tend.errors import TendError
from tend.service import Application, MultiService, Service, ServiceError, walk


class RecordingService(Service):
    """A service that appends ``privileged:NAME``, ``start:NAME`` and ``stop:NAME`` to *log*."""

    def __init__(
        self,
        name: str,
        log: list[str],
        *,
        fail_start: bool = False,
        fail_stop: bool = False,
    ) -> None:
        super().__init__(name)
        self.log = log
        self.fail_start = fail_start
        self.fail_stop = fail_stop

    def privileged_start_service(self) -> None:
        self.log.append(f"privileged:{self.name}")
        super().privileged_start_service()

    async def start_service(self) -> None:
        self.log.append(f"start:{self.name}")
        if self.fail_start:
            raise RuntimeError(f"{self.name} cannot start")
        await super().start_service()

    async def stop_service(self) -> None:
        self.log.append(f"stop:{self.name}")
        await super().stop_service()
        if self.fail_stop:
            raise RuntimeError(f"{self.name} cannot stop")


class RecordingMultiService(MultiService):
    """A collection that records its own start and stop around its children's."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__(name)
        self.log = log

    def privileged_start_service(self) -> None:
        self.log.append(f"privileged:{self.name}")
        super().privileged_start_service()

    async def start_service(self) -> None:
        self.log.append(f"start:{self.name}")
        await super().start_service()

    async def stop_service(self) -> None:
        self.log.append(f"stop:{self.name}")
        await super().stop_service()


async def settle() -> None:
    """Let the loop run until no task but the current one is left."""
    current = asyncio.current_task()
    await wait_until_async(lambda: asyncio.all_tasks() <= {current})


async def start(app: MultiService) -> None:
    """Start *app* as the runner does: the privileged phase over the tree, then the start."""
    app.privileged_start_service()
    await app.start_service()


def tree(log: list[str], *names: str) -> MultiService:
    """A collection holding one RecordingService per name, in order."""
    collection = MultiService("top")
    for name in names:
        RecordingService(name, log).set_service_parent(collection)
    return collection


async def test_starts_children_in_order_and_stops_them_in_reverse() -> None:
    """Children start in the order they were added and stop in the reverse order."""
    log: list[str] = []
    collection = tree(log, "a", "b", "c")

    await collection.start_service()
    await collection.stop_service()

    assert log == ["start:a", "start:b", "start:c", "stop:c", "stop:b", "stop:a"]


async def test_privileged_start_runs_over_the_whole_tree_before_any_start() -> None:
    """Every service's privileged start, nested ones included, runs before any start."""
    log: list[str] = []
    app = Application("app")
    RecordingService("a", log).set_service_parent(app)
    inner = RecordingMultiService("inner", log)
    inner.set_service_parent(app)
    RecordingService("b", log).set_service_parent(inner)
    RecordingService("c", log).set_service_parent(inner)
    RecordingService("d", log).set_service_parent(app)

    await start(app)

    assert log == [
        "privileged:a",
        "privileged:inner",
        "privileged:b",
        "privileged:c",
        "privileged:d",
        "start:a",
        "start:inner",
        "start:b",
        "start:c",
        "start:d",
    ]
    await app.stop_service()


async def test_nested_collections_stop_in_reverse_tree_order() -> None:
    """A nested collection stops its own children in reverse, in its place in the order."""
    log: list[str] = []
    app = Application("app")
    RecordingService("a", log).set_service_parent(app)
    inner = RecordingMultiService("inner", log)
    inner.set_service_parent(app)
    RecordingService("b", log).set_service_parent(inner)
    RecordingService("c", log).set_service_parent(inner)
    RecordingService("d", log).set_service_parent(app)
    await start(app)
    log.clear()

    await app.stop_service()

    assert log == ["stop:d", "stop:inner", "stop:c", "stop:b", "stop:a"]


async def test_running_is_true_between_start_and_stop() -> None:
    """`running` is false before start, true once started, and false again after stop."""
    log: list[str] = []
    collection = tree(log, "a", "b")
    children = list(collection)
    assert not collection.running
    assert not any(child.running for child in children)

    await start(collection)
    assert collection.running
    assert all(child.running for child in children)

    await collection.stop_service()
    assert not collection.running
    assert not any(child.running for child in children)


async def test_child_added_to_running_collection_is_started() -> None:
    """A child added to a running collection gets its privileged start and its start."""
    log: list[str] = []
    collection = tree(log, "a")
    await start(collection)
    log.clear()

    late = RecordingService("late", log)
    late.set_service_parent(collection)
    await wait_until_async(lambda: late.running)

    assert log == ["privileged:late", "start:late"]
    await collection.stop_service()
    assert log[-2:] == ["stop:late", "stop:a"]


async def test_child_added_to_stopped_collection_is_not_started() -> None:
    """Adding a child to a collection that is not running starts nothing."""
    log: list[str] = []
    collection = tree(log, "a")

    RecordingService("b", log).set_service_parent(collection)
    await settle()

    assert log == []
    assert not collection.get_service_named("b").running


async def test_child_that_fails_to_start_late_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A child added to a running collection that fails to start has its failure logged."""
    log: list[str] = []
    collection = tree(log, "a")
    await start(collection)

    RecordingService("late", log, fail_start=True).set_service_parent(collection)
    await wait_until_async(lambda: any(r.exc_info for r in caplog.records))

    (record,) = [r for r in caplog.records if r.exc_info]
    assert record.levelno == logging.ERROR
    assert "failed to start" in record.getMessage()
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "late cannot start"
    await collection.stop_service()


async def test_stop_waits_for_a_child_still_starting() -> None:
    """A collection stopped while a late child is still starting leaves that child stopped."""
    log: list[str] = []
    collection = tree(log, "a")
    await start(collection)
    late = RecordingService("late", log)
    late.set_service_parent(collection)

    await collection.stop_service()
    await settle()

    assert not late.running, log
    assert log[-1] == "stop:a"


async def test_removing_running_child_stops_it() -> None:
    """Removing a running child from a running collection stops that child."""
    log: list[str] = []
    collection = tree(log, "a", "b")
    await start(collection)
    b = collection.get_service_named("b")
    log.clear()

    collection.remove_service(b)
    await wait_until_async(lambda: not b.running)

    assert log == ["stop:b"]
    assert b.parent is None
    assert list(collection) == [collection.get_service_named("a")]
    await collection.stop_service()
    assert log == ["stop:b", "stop:a"]


async def test_stop_waits_for_a_removed_child_to_finish_stopping() -> None:
    """A collection's stop returns only after a child removed while running has stopped."""
    log: list[str] = []
    collection = tree(log, "a", "b")
    await start(collection)
    b = collection.get_service_named("b")

    collection.remove_service(b)
    await collection.stop_service()

    assert not b.running, log
    assert sorted(log[-2:]) == ["stop:a", "stop:b"]


async def test_disowning_a_running_child_stops_it() -> None:
    """disown_service_parent on a running child removes it and stops it."""
    log: list[str] = []
    collection = tree(log, "a")
    await start(collection)
    a = collection.get_service_named("a")

    a.disown_service_parent()
    await wait_until_async(lambda: not a.running)

    assert log[-1] == "stop:a"
    assert a.parent is None
    assert len(collection) == 0
    await collection.stop_service()


def test_removed_child_frees_its_name() -> None:
    """After a child is removed, its name can be used by a new child."""
    collection = MultiService()
    first = Service("a")
    first.set_service_parent(collection)

    collection.remove_service(first)
    second = Service("a")
    second.set_service_parent(collection)

    assert collection.get_service_named("a") is second


def test_refuses_a_duplicate_name() -> None:
    """Adding a second child with a taken name is a ServiceError naming the name."""
    collection = MultiService("top")
    Service("poetry").set_service_parent(collection)
    duplicate = Service("poetry")

    with pytest.raises(ServiceError, match="a service named 'poetry' is already there"):
        duplicate.set_service_parent(collection)

    assert duplicate.parent is None
    assert len(collection) == 1


def test_service_error_is_a_tend_error() -> None:
    """ServiceError derives from TendError, as every tend exception does."""
    assert issubclass(ServiceError, TendError)


def test_refuses_a_second_parent() -> None:
    """set_service_parent on a service that already has a parent is a ServiceError."""
    first = MultiService("first")
    second = MultiService("second")
    child = Service("child")
    child.set_service_parent(first)

    with pytest.raises(ServiceError, match="already has a parent"):
        child.set_service_parent(second)

    assert child.parent is first
    assert len(second) == 0


def test_refuses_the_same_parent_twice() -> None:
    """set_service_parent twice with the same parent is refused, not a double entry."""
    collection = MultiService()
    child = Service()
    child.set_service_parent(collection)

    with pytest.raises(ServiceError, match="already has a parent"):
        child.set_service_parent(collection)

    assert list(collection) == [child]


def test_refuses_to_disown_without_a_parent() -> None:
    """disown_service_parent on a service with no parent is a ServiceError."""
    with pytest.raises(ServiceError, match="has no parent"):
        Service("orphan").disown_service_parent()


def test_refuses_to_remove_a_stranger() -> None:
    """remove_service of a service that is not a child is a ServiceError."""
    collection = MultiService("top")
    stranger = Service("stranger")
    stranger.set_service_parent(MultiService("other"))

    with pytest.raises(ServiceError, match="is not a child of"):
        collection.remove_service(stranger)
    with pytest.raises(ServiceError, match="is not a child of"):
        collection.remove_service(Service("orphan"))


async def test_failed_start_stops_started_children_in_reverse() -> None:
    """A child that fails to start stops the ones already started, in reverse."""
    log: list[str] = []
    collection = MultiService("top")
    for name in ("a", "b"):
        RecordingService(name, log).set_service_parent(collection)
    RecordingService("c", log, fail_start=True).set_service_parent(collection)
    RecordingService("d", log).set_service_parent(collection)

    with pytest.raises(RuntimeError, match="c cannot start"):
        await start(collection)

    assert log == [
        "privileged:a",
        "privileged:b",
        "privileged:c",
        "privileged:d",
        "start:a",
        "start:b",
        "start:c",
        "stop:b",
        "stop:a",
    ]
    assert not collection.running
    assert not any(child.running for child in collection)


async def test_failed_start_in_nested_collection_stops_everything_started() -> None:
    """A failure deep in the tree stops the started services of every level, in reverse."""
    log: list[str] = []
    app = Application("app")
    RecordingService("a", log).set_service_parent(app)
    inner = MultiService("inner")
    inner.set_service_parent(app)
    RecordingService("b", log).set_service_parent(inner)
    RecordingService("c", log, fail_start=True).set_service_parent(inner)
    RecordingService("d", log).set_service_parent(app)

    with pytest.raises(RuntimeError, match="c cannot start"):
        await app.start_service()

    assert log == ["start:a", "start:b", "start:c", "stop:b", "stop:a"]
    assert not any(service.running for service in walk(app))


async def test_failed_stop_is_logged_and_siblings_still_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A child that fails to stop is logged with its traceback, and its siblings still stop."""
    log: list[str] = []
    collection = MultiService("top")
    RecordingService("a", log).set_service_parent(collection)
    RecordingService("b", log, fail_stop=True).set_service_parent(collection)
    RecordingService("c", log).set_service_parent(collection)
    await start(collection)
    log.clear()

    with caplog.at_level(logging.ERROR, logger="tend"):
        await collection.stop_service()

    assert log == ["stop:c", "stop:b", "stop:a"]
    assert not collection.running
    errors = [r for r in caplog.records if r.name == "tend"]
    assert len(errors) == 1
    assert errors[0].levelno == logging.ERROR
    assert "'b'" in errors[0].getMessage()
    assert errors[0].exc_info is not None
    assert str(errors[0].exc_info[1]) == "b cannot stop"


async def test_stop_skips_children_that_are_not_running() -> None:
    """Stopping a collection stops only the children that are running."""
    log: list[str] = []
    collection = tree(log, "a", "b")
    await start(collection)
    await collection.get_service_named("a").stop_service()
    log.clear()

    await collection.stop_service()

    assert log == ["stop:b"]


def test_get_service_named_finds_a_child_by_name() -> None:
    """get_service_named returns the child with that name."""
    collection = MultiService()
    a, b = Service("a"), Service("b")
    a.set_service_parent(collection)
    b.set_service_parent(collection)

    assert collection.get_service_named("a") is a
    assert collection.get_service_named("b") is b


def test_get_service_named_raises_key_error_for_an_unknown_name() -> None:
    """get_service_named for a name no child has raises KeyError."""
    collection = MultiService()
    Service("a").set_service_parent(collection)

    with pytest.raises(KeyError, match="missing"):
        collection.get_service_named("missing")


def test_name_set_as_attribute_before_parenting_is_used() -> None:
    """A name set as an attribute before the service gets a parent is the one looked up."""
    collection = MultiService()
    service = Service()
    service.name = "set-later"
    service.set_service_parent(collection)

    assert collection.get_service_named("set-later") is service


def test_unnamed_children_can_share_a_collection() -> None:
    """Any number of unnamed children may be added."""
    collection = MultiService()
    children = [Service() for _ in range(3)]
    for child in children:
        child.set_service_parent(collection)

    assert list(collection) == children


def test_iteration_yields_children_in_insertion_order() -> None:
    """Iterating a collection yields its children in the order they were added."""
    collection = MultiService()
    children = [Service(name) for name in ("z", "a", "m")]
    for child in children:
        collection.add_service(child)

    assert list(collection) == children
    assert len(collection) == 3
    assert all(child.parent is collection for child in children)


def test_iteration_survives_removal_during_the_loop() -> None:
    """Removing children while iterating over the collection skips none of them."""
    collection = MultiService()
    children = [Service(name) for name in ("a", "b", "c")]
    for child in children:
        child.set_service_parent(collection)

    seen = []
    for child in collection:
        seen.append(child)
        collection.remove_service(child)

    assert seen == children
    assert len(collection) == 0


def test_application_stores_name_uid_and_gid() -> None:
    """Application(name, uid=, gid=) keeps the name, user and group it was given."""
    by_number = Application("numbers", uid=1000, gid=1000)
    by_name = Application("names", uid="nobody", gid="nogroup")

    assert (by_number.name, by_number.uid, by_number.gid) == ("numbers", 1000, 1000)
    assert (by_name.name, by_name.uid, by_name.gid) == ("names", "nobody", "nogroup")
    assert isinstance(by_name, MultiService)


def test_application_user_and_group_default_to_none() -> None:
    """An Application without uid or gid leaves both None."""
    app = Application("plain")

    assert app.uid is None
    assert app.gid is None


def test_walk_yields_parents_before_children_in_order() -> None:
    """walk yields a service, then its children depth first, each level in insertion order."""
    app = Application("app")
    a = Service("a")
    a.set_service_parent(app)
    inner = MultiService("inner")
    inner.set_service_parent(app)
    b = Service("b")
    b.set_service_parent(inner)
    deeper = MultiService("deeper")
    deeper.set_service_parent(inner)
    c = Service("c")
    c.set_service_parent(deeper)
    d = Service("d")
    d.set_service_parent(app)

    assert list(walk(app)) == [app, a, inner, b, deeper, c, d]


def test_walk_of_a_leaf_yields_only_the_leaf() -> None:
    """walk over a plain service yields just that service."""
    leaf = Service("leaf")

    assert list(walk(leaf)) == [leaf]


def test_repr_names_the_class_and_service() -> None:
    """A service's repr shows its class and name, as error messages quote it."""
    assert repr(Service("poetry")) == "<Service 'poetry'>"
    assert repr(MultiService()) == "<MultiService>"

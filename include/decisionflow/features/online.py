"""Online reads of a feature service with Feast's values, without Feast's per-value response building.

``FeatureStore.get_online_features(features=service, entity_rows=rows).to_dict()`` spends most of its time
(~0.27 ms CPU per entity for ``risk_v1``) outside the online store: it converts every entity value to a
``ValueProto`` and back, builds a ``GetOnlineFeaturesResponse`` proto (one ``FeatureVector`` with statuses and
timestamps per feature), converts it *twice* to Python (once as the on-demand view's input, once for
``to_dict``), converts the on-demand outputs to protos and back, and re-resolves the service against the
registry (refreshing the registry when its cache expired) on every call.

:class:`OnlineFeatureReader` resolves the service once and then, per call, does only what decides the values:
one ``online_read`` of the provider per feature view for the distinct entities of the batch, a tight
``WhichOneof`` loop over the returned ``ValueProto`` s, and one call of each python-mode on-demand view on the
whole batch. It returns the same dict as ``get_online_features(...).to_dict()`` (same keys, same values; the
key order may differ: Feast orders a view's features by set iteration). What it replicates of Feast 0.67:

* **Missing entities** read as ``None`` for every feature of the view (SQLite returns no row, Redis empty
  values).
* **TTL**: Feast 0.67's online path (``OnlineStore.get_online_features`` -> ``_read_features_per_fv``) does
  *not* apply the view's TTL when reading: a row materialized into the online store is served (status
  ``PRESENT``) however old its event time. Only materialization windows and the precomputed-vector path of a
  ``precompute_online`` service look at TTLs. The reader therefore does not filter by age either; a service
  that would take the precomputed path is refused. :meth:`OnlineFeatureReader.read_with_event_times` also
  returns each view's event timestamp per row, so a caller (the serving gateway) can judge freshness itself.
* **Type round trips**: entity and request values go Python -> ``ValueProto`` -> Python in Feast (a ``NaN``
  request value becomes ``None``, an ``int`` amount in a float column becomes a float, ...), and so do the
  on-demand outputs (typed by the on-demand view's schema). Plain ``str`` / ``int`` / ``float`` columns take a
  fast path with the same outcome; anything else goes through Feast's own ``type_map`` functions.
* **On-demand input**: the UDF gets the dict Feast builds -- join keys, request fields, the features read for
  its source views under their short and ``view__feature`` names (``OnDemandFeatureView.transform_dict``),
  features of views it does not declare left out -- and only the outputs the service requests are returned.

What it does not reproduce is refused in ``__init__`` with :class:`UnsupportedFeatureServiceError` naming the
case (non-python on-demand modes, aggregations, write-to-online-store on-demand views, entityless or versioned
views, join key mappings, name collisions, precomputed vectors). The service is resolved once: after
``feast apply`` changes it, build a new reader.
"""

from __future__ import annotations

import copy
import warnings
from datetime import timezone
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from feast.errors import RequestDataNotFoundInEntityRowsException
from feast.feature_view import DUMMY_ENTITY_NAME, FeatureView
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import feast_value_type_to_python_type, python_values_to_proto_values
from feast.value_type import ValueType
from decisionflow.exceptions import NonRetryableError

if TYPE_CHECKING:
    from feast import FeatureStore

__all__ = ["OnlineFeatureReader", "UnsupportedFeatureServiceError"]

#: ``ValueProto`` fields whose Python value Feast returns as is (``feast_value_type_to_python_type``), unless
#: the declared type asks for a UUID parse of a string.
_PLAIN_FIELDS = frozenset({"int32_val", "int64_val", "double_val", "float_val", "string_val", "bytes_val",
                           "bool_val"})
_UUID_TYPES = frozenset({ValueType.UUID, ValueType.TIME_UUID, ValueType.UUID_LIST, ValueType.TIME_UUID_LIST,
                         ValueType.UUID_SET, ValueType.TIME_UUID_SET})
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class UnsupportedFeatureServiceError(NonRetryableError, ValueError):
    """The feature service uses something the reader cannot serve with exactly Feast's values."""


def _to_python(value: ValueProto, value_type: ValueType | None) -> Any:
    """``feast_value_type_to_python_type`` with a short cut for plain scalar fields (the common case)."""
    field = value.WhichOneof("val")
    if field is None:
        return None
    if field in _PLAIN_FIELDS and value_type not in _UUID_TYPES:
        return getattr(value, field)
    return feast_value_type_to_python_type(value, value_type)


def _round_trip(values: list, value_type: ValueType, read_type: ValueType | None = None,
                ) -> tuple[list, list[ValueProto] | None, ValueType]:
    """What Feast makes of Python ``values`` sent through ``python_values_to_proto_values(values, value_type)``
    and read back with ``feast_value_type_to_python_type(_, read_type)``: (Python values, protos or None, type).

    Columns of only ``str`` (STRING), ``int`` (INT64, in range) or ``float`` (DOUBLE; ``NaN`` -> ``None``) values
    and ``None`` come back unchanged without building protos (``None`` returned for them, with the type used:
    an ``UNKNOWN`` type is inferred from the first non-empty value as Feast does). Anything else goes through
    Feast's functions, and their protos are returned too.
    """
    if read_type not in _UUID_TYPES:
        sample = next((v for v in values if v is not None), None)
        kind = type(sample)
        if value_type == ValueType.UNKNOWN:
            value_type = {str: ValueType.STRING, int: ValueType.INT64, float: ValueType.DOUBLE}.get(kind,
                                                                                                   value_type)
        if sample is None:
            if value_type != ValueType.UNKNOWN or not values:
                return [None] * len(values), None, value_type
        elif value_type == ValueType.STRING and kind is str:
            if all(type(v) is str or v is None for v in values):
                return list(values), None, value_type
        elif value_type == ValueType.INT64 and kind is int:
            if all(v is None or (type(v) is int and _INT64_MIN <= v <= _INT64_MAX) for v in values):
                return list(values), None, value_type
        elif value_type == ValueType.DOUBLE and kind is float:
            if all(type(v) is float or v is None for v in values):
                return [None if v is None or v != v else v for v in values], None, value_type  # NaN: null
    protos = python_values_to_proto_values(list(values), value_type)
    return [_to_python(p, read_type) for p in protos], protos, value_type


def _utc(ts: Any) -> Any:
    """An online store's event timestamp as a timezone-aware UTC ``datetime`` (stores return naive UTC)."""
    if ts is None:
        return None
    if getattr(ts, "tzinfo", None) is None:
        return ts.replace(tzinfo=timezone.utc)
    return ts.astimezone(timezone.utc)


def _proto_for(value: Any, value_type: ValueType) -> ValueProto:
    """The ``ValueProto`` of one entity value that :func:`_round_trip` passed through unchanged."""
    if value_type == ValueType.STRING:
        return ValueProto(string_val=value)
    if value_type == ValueType.INT64:
        return ValueProto(int64_val=value)
    return python_values_to_proto_values([value], value_type)[0]


class _View:
    """One feature view to read: the view (with the service's projection), its join keys and columns."""

    __slots__ = ("view", "join_keys", "read", "types", "typed")

    def __init__(self, view: FeatureView, join_keys: list[str]):
        self.view = view
        self.join_keys = join_keys
        self.read: list[str] = []  # features fetched: requested ones, then on-demand inputs
        self.types: dict[str, ValueType] = {}
        self.typed: list[tuple[str, ValueType | None, bool]] = []  # (feature, type, plain fields read as is)


class _OnDemand:
    """One python-mode on-demand view: the UDF, the outputs requested, their types, the columns it must not see."""

    __slots__ = ("odfv", "outputs", "types", "hidden")

    def __init__(self, odfv: OnDemandFeatureView, outputs: list[str], hidden: set[str]):
        self.odfv = odfv
        self.outputs = outputs
        self.types = {f.name: f.dtype.to_value_type() for f in odfv.schema}
        self.hidden = hidden


class OnlineFeatureReader:
    """Reads a feature service's online values for a batch of entity rows, as ``get_online_features`` would.

    ``read(rows)`` returns exactly ``store.get_online_features(features=store.get_feature_service(name),
    entity_rows=rows).to_dict()`` (``full_feature_names=False``) -- see the module docstring for the Feast
    semantics replicated -- with one ``online_read`` per feature view for the batch's distinct entities.

    Args:
        store: the ``FeatureStore`` (its registry, config and provider are used).
        feature_service: name of the feature service in the store's registry.

    Raises:
        UnsupportedFeatureServiceError: the service uses a case whose values the reader cannot reproduce.
        feast.errors.FeatureServiceNotFoundException: no such service.
    """

    def __init__(self, store: FeatureStore, feature_service: str):
        self._store = store
        self._config = store.config
        self._online_read = store.provider.online_read
        registry, project = store.registry, store.project
        service = store.get_feature_service(feature_service, allow_cache=True)
        self.name = service.name

        # Feast accepts any project entity's join key (and, deprecated, its name) as an entity column.
        entities = registry.list_entities(project, allow_cache=True)
        self._join_key_of_name = {e.name: e.join_key for e in entities}
        self._known_join_keys = set(self._join_key_of_name.values())
        self._key_types: dict[str, ValueType] = {}

        views: dict[str, _View] = {}  # by projection name, in Feast's grouping order
        self._on_demand: list[_OnDemand] = []
        requested_features: list[tuple[str, str]] = []  # (view name, feature) of regular views
        odfv_requests: list[tuple[OnDemandFeatureView, Any]] = []
        self._request_fields: set[str] = set()

        def add_view(fv: FeatureView, projection) -> _View:
            name = projection.name_to_use()
            if name in views:
                return views[name]
            self._check_view(fv, projection)
            fv = fv.with_projection(copy.copy(projection))
            join_keys = []
            for entity_name in fv.entities:
                join_keys.append(self._join_key_of_name[entity_name])
            for column in fv.entity_columns:
                self._key_types[column.name] = column.dtype.to_value_type()
            views[name] = view = _View(fv, join_keys)
            return view

        for projection in service.feature_view_projections:
            if projection.version_tag is not None:
                raise UnsupportedFeatureServiceError(
                    f"{self.name}: view {projection.name} is pinned to version {projection.version_tag}; "
                    "versioned online reads are not supported")
            obj = registry.get_any_feature_view(projection.name, project, allow_cache=True)
            if isinstance(obj, OnDemandFeatureView):
                odfv_requests.append((obj, projection))
            elif isinstance(obj, FeatureView):
                view = add_view(obj, projection)
                for feature in projection.features:
                    view.view.projection.get_feature(feature.name)  # raises for a feature the view lacks
                    if feature.name not in view.read:
                        view.read.append(feature.name)
                    requested_features.append((view.view.projection.name_to_use(), feature.name))
            else:
                raise UnsupportedFeatureServiceError(
                    f"{self.name}: {projection.name} is a {type(obj).__name__}, not a FeatureView or "
                    "OnDemandFeatureView")

        if getattr(service, "precompute_online", False) and not odfv_requests:
            raise UnsupportedFeatureServiceError(
                f"{self.name}: precompute_online=True makes Feast serve precomputed vectors (with TTL statuses); "
                "not supported")

        # On-demand views: their source views' features are read too (Feast's _group_feature_refs).
        for odfv, projection in odfv_requests:
            self._check_on_demand(odfv)
            for source in odfv.source_feature_view_projections.values():
                source_fv = registry.get_any_feature_view(source.name, project, allow_cache=True)
                view = add_view(source_fv, source)
                for feature in source.features:
                    if feature.name not in view.read:
                        view.read.append(feature.name)
            self._request_fields.update(odfv.get_request_data_schema())
        self._views = list(views.values())
        for view in self._views:
            view.types = {f.name: f.dtype.to_value_type() for f in view.view.features if f.name in view.read}
            view.typed = [(name, view.types.get(name), view.types.get(name) not in _UUID_TYPES) for name in view.read]
        # Feast's to_dict reads every column with the type of a read feature of that name (OnlineResponse).
        self._feature_types = {name: t for view in self._views for name, t in view.types.items()}

        # Features Feast hides from each UDF: those of requested views the on-demand view does not declare
        # (short and view__feature names), and inputs read only for another on-demand view.
        for odfv, projection in odfv_requests:
            declared = {p.name for p in odfv.source_feature_view_projections.values()}
            hidden: set[str] = set()
            for view_name, feature in requested_features:
                if view_name not in declared:
                    hidden.update((feature, f"{view_name}__{feature}"))
            for other, _ in odfv_requests:
                for source in other.source_feature_view_projections.values():
                    if source.name not in declared:
                        for feature in source.features:
                            hidden.update((feature.name, f"{source.name}__{feature.name}"))
            outputs = [f.name for f in projection.features]
            for name in outputs:
                odfv.projection.get_feature(name)  # raises for an output the view lacks
            self._on_demand.append(_OnDemand(odfv, outputs, hidden))

        self._requested = {view_name: [] for view_name in views}
        for view_name, feature in requested_features:
            if feature not in self._requested[view_name]:
                self._requested[view_name].append(feature)
        outputs = [f for names in self._requested.values() for f in names] + [
            name for od in self._on_demand for name in od.outputs]
        collisions = sorted({name for name in outputs if outputs.count(name) > 1})
        read_columns = [name for view in self._views for name in view.read]
        collisions += sorted({name for name in read_columns if read_columns.count(name) > 1} - set(collisions))
        if collisions:
            raise UnsupportedFeatureServiceError(
                f"{self.name}: feature names {collisions} occur in more than one view (Feast raises "
                "FeatureNameCollisionError without full_feature_names, which the reader does not offer)")
        self._plans: dict[tuple[str, ...], tuple] = {}

    # -- checks --------------------------------------------------------------------------------------------------
    def _check_view(self, fv: FeatureView, projection) -> None:
        """Refuse views Feast would serve differently from a plain per-view ``online_read``."""
        if fv.entities and fv.entities[0] == DUMMY_ENTITY_NAME or not fv.entities:
            raise UnsupportedFeatureServiceError(f"{self.name}: view {fv.name} has no entity (entityless views "
                                                 "are not supported)")
        if projection.join_key_map:
            raise UnsupportedFeatureServiceError(f"{self.name}: view {fv.name} maps join keys "
                                                 f"{projection.join_key_map}; join key mappings are not supported")
        if getattr(fv, "enabled", True) is False:
            raise UnsupportedFeatureServiceError(f"{self.name}: view {fv.name} is disabled (Feast refuses to "
                                                 "serve it)")
        state = getattr(fv, "state", None)
        if state is not None and getattr(state, "name", "STATE_UNSPECIFIED") not in (
                "STATE_UNSPECIFIED", "AVAILABLE_ONLINE"):
            raise UnsupportedFeatureServiceError(f"{self.name}: view {fv.name} is in state {state.name}; only "
                                                 "AVAILABLE_ONLINE views are served")
        for entity_name in fv.entities:
            if entity_name not in self._join_key_of_name:
                raise UnsupportedFeatureServiceError(f"{self.name}: view {fv.name} uses unknown entity "
                                                     f"{entity_name}")

    def _check_on_demand(self, odfv: OnDemandFeatureView) -> None:
        """Only python-mode transformations evaluated at read time are reproduced."""
        if odfv.mode != "python":
            raise UnsupportedFeatureServiceError(
                f"{self.name}: on-demand view {odfv.name} has mode {odfv.mode!r}; only mode='python' is supported")
        if odfv.write_to_online_store:
            raise UnsupportedFeatureServiceError(
                f"{self.name}: on-demand view {odfv.name} writes to the online store; not supported")
        if odfv.aggregations:
            raise UnsupportedFeatureServiceError(
                f"{self.name}: on-demand view {odfv.name} has aggregations; not supported")
        if odfv.feature_transformation is None:
            raise UnsupportedFeatureServiceError(
                f"{self.name}: on-demand view {odfv.name} has no transformation")
        if getattr(odfv, "source_feature_view_projections", None) is None:
            raise UnsupportedFeatureServiceError(f"{self.name}: on-demand view {odfv.name} has no sources")

    # -- reading -------------------------------------------------------------------------------------------------
    def _plan(self, keys: tuple[str, ...]) -> tuple:
        """Per distinct set of row keys: (join key columns [(row key, join key)], request fields), as Feast
        classifies them: request data first, then join keys, then (deprecated) entity names; others ignored."""
        join_columns: list[tuple[str, str]] = []
        for key in keys:
            if key in self._request_fields:
                continue
            if key in self._known_join_keys:
                join_columns.append((key, key))
            elif key in self._join_key_of_name:
                join_columns.append((key, self._join_key_of_name[key]))
        missing = sorted(self._request_fields - set(keys))
        if missing:
            raise RequestDataNotFoundInEntityRowsException(feature_names=missing)
        given = {join_key for _, join_key in join_columns}
        for view in self._views:
            absent = [k for k in view.join_keys if k not in given]
            if absent:
                raise KeyError(f"{self.name}: entity rows lack join key(s) {absent} of view {view.view.name}")
        request = [key for key in keys if key in self._request_fields]
        return join_columns, request

    @property
    def view_names(self) -> list[str]:
        """The feature views read (the service's views and the sources of its on-demand views), in read order."""
        return [view.view.projection.name_to_use() for view in self._views]

    @property
    def view_ttls(self) -> dict[str, Any]:
        """Each read view's Feast TTL (a ``timedelta``; ``None`` or zero = no limit)."""
        return {view.view.projection.name_to_use(): view.view.ttl for view in self._views}

    def read_with_event_times(self, entity_rows: Sequence[dict[str, Any]]
                              ) -> tuple[dict[str, list], dict[str, list]]:
        """:meth:`read`, plus per feature view the event timestamp of the online row each entity row got.

        Returns ``(values, event_times)``: ``values`` exactly as :meth:`read`; ``event_times[view]`` one
        timezone-aware ``datetime`` per row (``None`` where the entity is not in the online store). Feast 0.67
        serves a row however old (no TTL online): the event times let the caller judge freshness itself.
        """
        times: dict[str, list] = {}
        return self._read(entity_rows, times), times

    def read(self, entity_rows: Sequence[dict[str, Any]]) -> dict[str, list]:
        """The service's online values for ``entity_rows``: ``{column: [value per row]}``.

        Columns: the join keys given in the rows, then each requested feature (``None`` where the entity is
        not in the online store), then the on-demand outputs -- what ``get_online_features(...).to_dict()``
        returns. Every row must have the same keys; request fields (``amount``) are inputs, not outputs.

        Raises:
            ValueError: no rows, rows with different keys, or a ``None`` join key value.
            KeyError: a view's join key is missing from the rows.
            feast.errors.RequestDataNotFoundInEntityRowsException: a request field is missing.
        """
        return self._read(entity_rows, None)

    def _read(self, entity_rows: Sequence[dict[str, Any]], times: dict[str, list] | None) -> dict[str, list]:
        if not entity_rows:
            raise ValueError("entity_rows is empty")
        keys = tuple(entity_rows[0])
        n_keys = len(keys)
        try:
            columns = {key: [row[key] for row in entity_rows] for key in keys}
        except KeyError as e:
            raise ValueError(f"All entity_rows must have the same keys (a row lacks {e})") from None
        if any(len(row) != n_keys for row in entity_rows):
            raise ValueError("All entity_rows must have the same keys.")
        plan = self._plans.get(keys)
        if plan is None:
            plan = self._plans[keys] = self._plan(keys)
        join_columns, request_fields = plan
        n = len(entity_rows)

        response: dict[str, list] = {}
        key_values: dict[str, list] = {}
        key_protos: dict[str, tuple[list[ValueProto] | None, ValueType]] = {}
        for row_key, join_key in join_columns:
            if row_key != join_key:
                warnings.warn("Using entity name is deprecated. Use join_key instead.")
            value_type = self._key_types.get(join_key, ValueType.UNKNOWN)
            values, protos, value_type = _round_trip(columns[row_key], value_type, self._feature_types.get(join_key))
            response[join_key] = key_values[join_key] = values
            key_protos[join_key] = protos, value_type

        read_columns: dict[str, list] = {}
        for view in self._views:
            read_columns.update(self._read_view(view, key_values, key_protos, n, times))
        requested = self._requested
        for view in self._views:
            for name in requested[view.view.projection.name_to_use()]:
                response[name] = read_columns[name]

        if self._on_demand:
            request_values = {key: _round_trip(columns[key], ValueType.UNKNOWN,
                                               self._feature_types.get(key))[0] for key in request_fields}
            for od in self._on_demand:
                response.update(self._transform(od, key_values, request_values, read_columns))
        return response

    def _read_view(self, view: _View, key_values: dict[str, list], key_protos: dict[str, tuple],
                   n: int, times: dict[str, list] | None = None) -> dict[str, list]:
        """One ``online_read`` for the distinct entities of the batch; the view's columns fanned out to rows."""
        join_keys = view.join_keys
        # The distinct entities (Feast's _get_unique_entities), keyed by their Python values.
        if len(join_keys) == 1:
            column = key_values[join_keys[0]]
            row_entities = column
        else:
            row_entities = list(zip(*(key_values[k] for k in join_keys)))
        slot: dict[Any, int] = {}
        first_row: list[int] = []
        for i, entity in enumerate(row_entities):
            if entity not in slot:
                slot[entity] = len(first_row)
                first_row.append(i)
        if None in slot or (len(join_keys) > 1 and any(None in e for e in slot)):
            raise ValueError(f"{self.name}: a join key of view {view.view.name} is None")
        entity_keys = []
        for i in first_row:
            values = []
            for k in join_keys:
                protos, value_type = key_protos[k]
                values.append(protos[i] if protos is not None else _proto_for(key_values[k][i], value_type))
            entity_keys.append(EntityKeyProto(join_keys=join_keys, entity_values=values))

        rows = self._online_read(config=self._config, table=view.view, entity_keys=entity_keys,
                                 requested_features=list(view.read))  # a copy: stores may append to it

        names = view.read
        missing = (None,) * len(names)
        plain, to_python = _PLAIN_FIELDS, feast_value_type_to_python_type
        per_entity = []
        for _, data in rows:
            if data is None:
                per_entity.append(missing)
                continue
            out = []
            append = out.append
            # the tight loop: 1 dict lookup + WhichOneof + getattr per value (no enum hashing: flags precomputed)
            for name, value_type, plain_ok in view.typed:
                value = data.get(name)
                if value is None:
                    append(None)
                    continue
                field = value.WhichOneof("val")
                if field is None:
                    append(None)
                elif plain_ok and field in plain:
                    append(getattr(value, field))
                else:
                    append(to_python(value, value_type))
            per_entity.append(out)
        if len(first_row) == n:  # every row a distinct entity: rows in read order already
            by_row = per_entity
        else:
            by_row = [per_entity[slot[e]] for e in row_entities]
        if times is not None:  # the event timestamp of each entity's online row (None: not in the store)
            entity_times = [_utc(ts) if data is not None else None for ts, data in rows]
            # Redis answers an absent entity with empty values and a zero timestamp (SQLite with no row at all)
            entity_times = [None if ts is not None and ts.timestamp() == 0 else ts for ts in entity_times]
            times[view.view.projection.name_to_use()] = (
                entity_times if len(first_row) == n else [entity_times[slot[e]] for e in row_entities])
        return {name: list(values) for name, values in zip(names, zip(*by_row))}

    def _transform(self, od: _OnDemand, key_values: dict[str, list], request_values: dict[str, list],
                   read_columns: dict[str, list]) -> dict[str, list]:
        """The on-demand view's UDF on the batch (Feast's input dict), outputs typed as Feast types them."""
        inputs: dict[str, list] = {}
        for name, values in (*key_values.items(), *request_values.items(), *read_columns.items()):
            if name not in od.hidden:
                inputs[name] = list(values)  # copies: the UDF may modify its input lists
        transformed = od.odfv.transform_dict(inputs)
        out: dict[str, list] = {}
        for name in transformed:
            if name not in od.outputs:
                continue
            vector = transformed[name]
            vector = vector if isinstance(vector, list) else [vector]
            out[name] = _round_trip(vector, od.types.get(name, ValueType.UNKNOWN), self._feature_types.get(name))[0]
        return out


"""The set statements of the batch path: one statement for a whole batch of rows, on PostgreSQL.

They bind one array per column (``unnest``) instead of one placeholder per value, so the statement
text does not grow with the batch; a column whose value is the same on every row (``updated_at``,
the consumer, the outcome ...) is bound once, as a scalar. They run on a server-binding cursor: the
arrays travel as parameters instead of being quoted into the SQL text in Python, which would cost
more than anything else in a batch. On SQLite (the demo) each falls back to the ORM.
"""

from __future__ import annotations

from typing import Any, cast

from django.db import connection, models
from django.utils import timezone


def set_cursor():
    """A Django cursor (error translation, query logging) that binds parameters on the server."""
    from django.db.backends.postgresql.base import ServerBindingCursor

    connection.ensure_connection()
    return connection._prepare_cursor(ServerBindingCursor(connection.connection))


def rows_source(columns: list[tuple[str, str, list[Any]]], *, varying: int = 1) -> tuple[list[str], str, list[Any]]:
    """Rows given column by column, as SQL: (an expression per column, the FROM clause, the parameters).

    ``columns`` are (column name, SQL type, values); the first ``varying`` ones are always
    unnested (the key: it keeps the row count). The expressions read ``v.<column>`` or a
    scalar placeholder; the parameters are in the order the caller's SQL mentions them:
    the expressions first, then the FROM clause.
    """
    qn = connection.ops.quote_name
    exprs: list[str] = []
    scalars: list[Any] = []
    names: list[str] = []
    arrays: list[str] = []
    unnested: list[Any] = []
    for index, (column, sql_type, values) in enumerate(columns):
        first = values[0]
        if index >= varying and all(v == first and type(v) is type(first) for v in values):
            exprs.append(f"%s::{sql_type}")
            scalars.append(first)
        else:
            exprs.append(f"v.{qn(column)}")
            names.append(qn(column))
            arrays.append(f"%s::{sql_type}[]")
            unnested.append(values)
    return exprs, f"unnest({', '.join(arrays)}) WITH ORDINALITY AS v ({', '.join(names)}, _n)", scalars + unnested


_cast_types: dict[tuple[str, models.Field], str] = {}


def cast_type(field: models.Field) -> str:
    """``field.cast_db_type(connection)``, computed once per field and database vendor: Django
    formats the type from the field's parameters every time, a tenth of a small batch's CPU."""
    key = (connection.vendor, field)
    found = _cast_types.get(key)
    if found is None:
        found = _cast_types[key] = field.cast_db_type(connection)  # type: ignore[attr-defined]
    return found


def _columns(fields: list[models.Field], objs: list[models.Model], *, add: bool) -> list[tuple[str, str, list[Any]]]:
    now = timezone.now()
    columns = []
    for f in fields:
        if getattr(f, "auto_now", False) or (add and getattr(f, "auto_now_add", False)):
            values = [f.get_db_prep_save(now, connection)] * len(objs)  # one instant for the whole statement
        else:
            values = [f.get_db_prep_save(f.pre_save(obj, add), connection) for obj in objs]
        columns.append((f.column, cast_type(f), values))
    return columns


def lock_versions(model: type[models.Model], version_field: str, keys: set[Any]) -> dict[Any, int]:
    """``SELECT pk, version ... WHERE pk = ANY(keys) ORDER BY pk FOR UPDATE``: the held versions, rows locked."""
    if connection.vendor != "postgresql":  # SQLite (the demo): the ORM; the write lock serialises anyway
        rows = model._default_manager.select_for_update().filter(pk__in=keys).order_by("pk")
        return dict(rows.values_list("pk", version_field))
    qn = connection.ops.quote_name
    meta = model._meta
    pk = meta.pk
    version = cast(models.Field, meta.get_field(version_field))
    values = [pk.get_db_prep_value(key, connection) for key in sorted(keys)]
    with set_cursor() as cursor:
        cursor.execute(
            f"SELECT {qn(pk.column)}, {qn(version.column)} FROM {qn(meta.db_table)} "  # noqa: S608 - names from the model
            f"WHERE {qn(pk.column)} = ANY(%s::{cast_type(pk)}[]) ORDER BY {qn(pk.column)} FOR UPDATE",
            [values],
        )
        return {pk.to_python(key): held for key, held in cursor.fetchall()}


def insert_new(model: type[models.Model], fields: list[models.Field], objs: list[models.Model]) -> int:
    """INSERT ... ON CONFLICT DO NOTHING; returns how many rows were really inserted."""
    if connection.vendor != "postgresql":
        before = model._default_manager.filter(pk__in=[o.pk for o in objs]).count()
        model._default_manager.bulk_create(objs, ignore_conflicts=True)
        return model._default_manager.filter(pk__in=[o.pk for o in objs]).count() - before
    qn = connection.ops.quote_name
    exprs, source, params = rows_source(_columns(fields, objs, add=True))
    with set_cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {qn(model._meta.db_table)} ({', '.join(qn(f.column) for f in fields)}) "  # noqa: S608 - names from the model, values bound
            f"SELECT {', '.join(exprs)} FROM {source} ORDER BY v._n ON CONFLICT DO NOTHING",
            params,
        )
        return cursor.rowcount


def update_locked(
    model: type[models.Model],
    fields: list[models.Field],
    objs: list[models.Model],
    *,
    only_after: models.Field | None = None,
) -> int:
    """UPDATE ... FROM unnest(...) of rows this transaction holds locked; ``fields[0]`` is the key.

    With ``only_after`` (the version field, one of ``fields``) a row is updated only where it holds
    the version just before the one written — the version rule's "apply", decided by the statement
    itself (and a row it did not lock yet is locked by the UPDATE). Returns the rows updated.
    """
    if only_after is not None:
        fields = [fields[0], only_after, *(f for f in fields[1:] if f is not only_after)]
    if connection.vendor != "postgresql":  # SQLite (the demo): one UPDATE per row, auto_now included
        updated = 0
        for obj in objs:
            rows = model._default_manager.filter(pk=obj.pk)
            if only_after is not None:
                rows = rows.filter(**{only_after.attname: getattr(obj, only_after.attname) - 1})
            updated += rows.update(**{f.attname: f.pre_save(obj, False) for f in fields[1:]})
        return updated
    qn = connection.ops.quote_name
    table = qn(model._meta.db_table)
    pk = qn(fields[0].column)
    # With only_after the version is always unnested (v.<version>): the condition reads it once more.
    exprs, source, params = rows_source(_columns(fields, objs, add=False), varying=1 if only_after is None else 2)
    assignments = ", ".join(f"{qn(f.column)} = {expr}" for f, expr in zip(fields[1:], exprs[1:], strict=True))
    where = f"{table}.{pk} = v.{pk}"
    if only_after is not None:
        where += f" AND {table}.{qn(only_after.column)} = v.{qn(only_after.column)} - 1"
    with set_cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET {assignments} FROM {source} WHERE {where}",  # noqa: S608 - names from the model, values bound
            params,
        )
        return cursor.rowcount

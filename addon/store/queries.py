"""The reading queries of the request ledger, built once for SQLite and PostgreSQL.

``Ledger`` (SQLite, one node) and ``CentralStore`` (PostgreSQL, the fleet) answer the
same questions of the same ``requests`` table: rows by filter, counts, a time span,
spend per time bucket and the grouped report. The SQL differs only in a few words of
dialect (placeholders, the arrival-order column, integer casts, collation and where
NULLs sort, turning a timestamp into epoch seconds), which ``Dialect`` holds; so a
figure the report gains, or a filter, is written once and both backends agree.

Each builder validates its arguments (``ValueError``) and returns ``(sql, params)``;
``LedgerReads`` is the reading half of both stores, over the one method each backend
provides to run a query (``_rows``).

This module imports neither click nor mitmproxy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from spendtap.store.rows import COLUMNS, OUTCOMES, REPORT_BY, REPORT_SORT, _row_out, usd
from spendtap.timeparse import normalize_ts

__all__ = [
    "POSTGRES",
    "SQLITE",
    "Dialect",
    "LedgerReads",
    "count_sql",
    "report_row",
    "report_sql",
    "requests_sql",
    "spend_series_sql",
    "time_span_sql",
]

Params = dict[str, Any]

# The filters every reading query takes, as keyword arguments.
FILTERS = ("account", "key", "model", "node", "outcome")
SERIES_BY = ("account", "key", "model", "node")
_SPEND = "coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)"


@dataclass(frozen=True, slots=True)
class Dialect:
    """The words in which the two backends' SQL differs; the defaults are SQLite's (which
    needs no cast, compares text bytewise, and sorts NULL below every value: first
    ascending, last descending)."""

    placeholder: str  # a named parameter, with {} for its name
    seq: str  # the column that orders rows by arrival
    round_avg: Callable[[str, int], str]  # the average of a column, rounded to n places
    epoch: Callable[[str], str]  # ledger ``ts`` text as whole Unix seconds
    bigint: str = ""  # the cast that makes a sum an integer (PostgreSQL's sum is numeric)
    collate: str = ""  # text compared bytewise
    nulls_first: str = ""  # after an ascending key whose NULLs must come first
    nulls_last: str = ""  # after a descending key whose NULLs must come last

    def p(self, name: str) -> str:
        return self.placeholder.format(name)


SQLITE = Dialect(
    ":{}",
    "rowid",
    lambda col, n: f"round(avg({col}), {n})",
    lambda ts: f"CAST(strftime('%s', substr({ts}, 1, 19)) AS INTEGER)",
)

POSTGRES = Dialect(
    "%({})s",
    "seq",
    lambda col, n: f"round(avg({col})::numeric, {n})::float",
    lambda ts: f"extract(epoch FROM substr({ts}, 1, 19)::timestamp)::bigint",
    bigint="::bigint",
    collate=' COLLATE "C"',
    nulls_first=" NULLS FIRST",
    nulls_last=" NULLS LAST",
)


def _count_if(condition: str) -> str:
    # count() of a CASE: an integer (0 for none) in both databases, whatever their version.
    return f"count(CASE WHEN {condition} THEN 1 END)"


def where(
    d: Dialect,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    **filters: str | None,
) -> tuple[list[str], Params]:
    """The WHERE clauses and parameters of a time range (``since`` inclusive, ``until``
    exclusive) and the equality filters ``FILTERS``."""
    unknown = set(filters) - set(FILTERS)
    if unknown:
        raise TypeError(f"unknown filter(s): {', '.join(sorted(unknown))}")
    outcome = filters.get("outcome")
    if outcome is not None and outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
    clauses: list[str] = []
    params: Params = {}
    if since is not None:
        clauses.append(f"ts >= {d.p('since')}")
        params["since"] = normalize_ts(since)
    if until is not None:
        clauses.append(f"ts < {d.p('until')}")
        params["until"] = normalize_ts(until)
    for name in FILTERS:
        value = filters.get(name)
        if value is not None:
            clauses.append(f"{name} = {d.p(name)}")
            params[name] = value
    return clauses, params


def _from_requests(clauses: list[str]) -> str:
    return "FROM requests" + ((" WHERE " + " AND ".join(clauses)) if clauses else "")


def requests_sql(
    d: Dialect,
    *,
    limit: int | None = None,
    after_rowid: int | None = None,
    order: str = "desc",
    include_rowid: bool = False,
    **filters: Any,
) -> tuple[str, Params]:
    """Rows (``COLUMNS``) by ``ts`` then arrival, or after an arrival mark in arrival order."""
    if order not in ("asc", "desc"):
        raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be zero or more, not {limit}")
    clauses, params = where(d, **filters)
    if after_rowid is not None:
        clauses.append(f"{d.seq} > {d.p('after_rowid')}")
        params["after_rowid"] = after_rowid
        order_by = f"{d.seq} {order}"
    else:
        order_by = f"ts {order}, {d.seq} {order}"
    columns = ", ".join((f"{d.seq} AS rowid", *COLUMNS) if include_rowid else COLUMNS)
    sql = f"SELECT {columns} {_from_requests(clauses)} ORDER BY {order_by}"
    if limit is not None:
        sql += f" LIMIT {d.p('limit')}"
        params["limit"] = limit
    return sql, params


def count_sql(d: Dialect, **filters: Any) -> tuple[str, Params]:
    """How many rows match."""
    clauses, params = where(d, **filters)
    return f"SELECT count(*) AS n {_from_requests(clauses)}", params


def time_span_sql(d: Dialect, **filters: Any) -> tuple[str, Params]:
    """The first and last ``ts`` of the rows that match."""
    clauses, params = where(d, **filters)
    return f"SELECT min(ts) AS first, max(ts) AS last {_from_requests(clauses)}", params


def spend_series_sql(
    d: Dialect, by: str, bucket_s: int, metric: str = "tokens", **filters: Any
) -> tuple[str, Params]:
    """Columns ``grp``, ``bucket`` (epoch seconds), ``value`` and ``refused``, by group
    (NULL first, text bytewise) then bucket."""
    if metric not in ("tokens", "cost"):
        raise ValueError(f"metric must be tokens or cost, not {metric!r}")
    if by not in SERIES_BY:
        raise ValueError(f"by must be account, key, model or node, not {by!r}")
    if isinstance(bucket_s, bool) or not isinstance(bucket_s, int) or bucket_s <= 0:
        raise ValueError(f"bucket_s must be a positive whole number, not {bucket_s!r}")
    clauses, params = where(d, **filters)
    params["bucket"] = bucket_s
    spent = "cost_nusd" if metric == "cost" else _SPEND
    bucket = d.p("bucket")
    sql = f"""
        SELECT {by} AS grp,
               ({d.epoch("ts")} / {bucket}) * {bucket} AS bucket,
               coalesce(sum({spent}), 0){d.bigint} AS value,
               {_count_if("outcome = 'rejected'")} AS refused
        {_from_requests(clauses)}
        GROUP BY grp, bucket
    """
    order = f"grp{d.collate}{d.nulls_first}, bucket"
    return f"SELECT * FROM ({sql}) AS series ORDER BY {order}", params


def report_sql(d: Dialect, by: str, sort: str | None = None, **filters: Any) -> tuple[str, Params]:
    """Usage and cost totals grouped by ``by`` (see ``Ledger.report``); the group is ``grp``,
    the cost in nano-dollars ``cost_nusd`` with ``priced`` rows (``report_row`` finishes a
    row)."""
    if by not in REPORT_BY:
        raise ValueError(f"by must be one of {', '.join(REPORT_BY)}, not {by!r}")
    if sort is not None and sort not in REPORT_SORT:
        raise ValueError(f"sort must be one of {', '.join(REPORT_SORT)}, not {sort!r}")
    if by == "day":
        group = "substr(ts, 1, 10)"
    elif by == "hour":
        group = "substr(ts, 1, 13) || ':00:00Z'"
    else:
        group = by
    clauses, params = where(d, **filters)
    grp = f"grp IS NULL, grp{d.collate}"
    tie = f"requests DESC, {grp}"
    if sort == "cost":
        order_by = f"cost_nusd IS NULL, cost_nusd DESC, total_tokens DESC{d.nulls_last}, {tie}"
    elif sort == "requests":
        order_by = f"requests DESC, total_tokens DESC{d.nulls_last}, {grp}"
    elif sort == "tokens" or by not in ("day", "hour"):
        order_by = f"total_tokens IS NULL, total_tokens DESC, {tie}"
    else:
        order_by = f"grp{d.collate}{d.nulls_first}"
    sums = ",\n".join(
        f"sum({c}){d.bigint} AS {c}"
        for c in (
            "prompt_tokens",
            "completion_tokens",
            "cached_tokens",
            "cache_creation_tokens",
            "reasoning_tokens",
        )
    )
    sql = f"""
        SELECT
            {group} AS grp,
            count(*) AS requests,
            {sums},
            CASE WHEN count(prompt_tokens) + count(completion_tokens) = 0 THEN NULL
                 ELSE coalesce(sum(prompt_tokens), 0) + coalesce(sum(completion_tokens), 0)
            END{d.bigint} AS total_tokens,
            {_count_if("outcome NOT IN ('completed', 'rejected')")} AS errors,
            {_count_if("outcome = 'rejected'")} AS refused,
            {_count_if("(usage_source IS NULL OR usage_source = 'none') AND outcome != 'rejected'")}
                AS usage_missing,
            {d.round_avg("ttft_s", 4)} AS avg_ttft_s,
            {d.round_avg("tokens_per_s", 2)} AS avg_tokens_per_s,
            sum(cost_nusd) AS cost_nusd,
            count(cost_nusd) AS priced,
            {_count_if("price_source = 'none'")} AS unpriced
        {_from_requests(clauses)}
        GROUP BY grp
    """
    # PostgreSQL orders by expressions of output names only from an outer query.
    return f"SELECT * FROM ({sql}) AS totals ORDER BY {order_by}", params


def report_row(by: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """A row of ``report_sql`` as ``report`` returns it: the group under the name of
    ``by``, the cost as exact dollars (sum and average over the priced rows)."""
    out = {by: row["grp"], **{k: v for k, v in row.items() if k != "grp"}}
    nusd, priced = out.pop("cost_nusd"), out.pop("priced")
    # Sums of whole nano-dollars: exact, whatever the number of rows (PostgreSQL's sum
    # of a bigint is a numeric, hence int()).
    out["cost_usd"] = usd(None if nusd is None else int(nusd))
    out["avg_cost_usd"] = usd(Decimal(int(nusd)) / priced) if priced else None
    return out


class LedgerReads:
    """The reading methods of a store of request rows (``Ledger``, ``CentralStore``): one
    signature and one meaning for both, each query built for the store's ``dialect`` and
    run by its ``_rows``."""

    dialect: Dialect

    def _rows(self, sql: str, params: Params) -> Iterator[dict[str, Any]]:
        """Run a query now; its rows as dicts by column name (fetched lazily or not)."""
        raise NotImplementedError

    def requests(
        self,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
        account: str | None = None,
        key: str | None = None,
        model: str | None = None,
        node: str | None = None,
        outcome: str | None = None,
        limit: int | None = None,
        after_rowid: int | None = None,
        order: str = "desc",
        include_rowid: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """Request rows as dicts (keys ``COLUMNS``; ``streamed`` a bool; ``cost_usd`` too).

        ``since`` is inclusive, ``until`` exclusive. Rows are ordered by ``ts`` (then
        arrival), newest first unless ``order="asc"``. With ``after_rowid`` only rows
        that arrived after that mark are returned, in arrival order (for following the
        ledger live); ``include_rowid`` adds each row's ``rowid`` (the central store's
        arrival sequence). The query runs (and raises) when called.
        """
        sql, params = requests_sql(
            self.dialect, since=since, until=until, account=account, key=key, model=model,
            node=node, outcome=outcome, limit=limit, after_rowid=after_rowid, order=order,
            include_rowid=include_rowid,
        )  # fmt: skip
        return (_row_out(row) for row in self._rows(sql, params))

    def count(self, **filters: Any) -> int:
        """How many request rows match the filters of ``requests()``."""
        sql, params = count_sql(self.dialect, **filters)
        return next(self._rows(sql, params))["n"]

    def time_span(self, **filters: Any) -> tuple[str, str] | None:
        """The first and last ``ts`` of the rows matching the filters, None if none do."""
        sql, params = time_span_sql(self.dialect, **filters)
        row = next(self._rows(sql, params))
        return None if row["first"] is None else (row["first"], row["last"])

    def spend_series(
        self,
        by: str,
        bucket_s: int,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
        metric: str = "tokens",
        **filters: Any,
    ) -> list[dict[str, Any]]:
        """Tokens spent (prompt + completion), or with ``metric="cost"`` nano-dollars,
        per ``by`` group and time bucket.

        ``by`` is ``account``, ``key``, ``model`` or ``node``. Each dict has the
        group under ``by`` (None for rows without one), ``bucket`` (the Unix time
        at which its ``bucket_s``-second bucket starts, aligned to the epoch),
        ``value`` and ``refused`` (requests spendtap refused, which spend
        nothing); ordered by group, then bucket. Filters as in ``requests()``.
        """
        sql, params = spend_series_sql(
            self.dialect, by, bucket_s, metric, since=since, until=until, **filters
        )
        return [
            {by: r["grp"], "bucket": int(r["bucket"]), "value": int(r["value"]),
             "refused": int(r["refused"])}
            for r in self._rows(sql, params)
        ]  # fmt: skip

    def report(
        self,
        by: str,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
        account: str | None = None,
        key: str | None = None,
        model: str | None = None,
        node: str | None = None,
        outcome: str | None = None,
        sort: str | None = None,
    ) -> list[dict[str, Any]]:
        """Usage and cost totals grouped by a row field (``REPORT_BY``), ``day`` or ``hour``.

        Each dict has the group value under the name of ``by`` (``None`` for
        anonymous rows; ``day`` as ``2025-01-31``, ``hour`` as ``2025-01-31T12:00:00Z``,
        both UTC), then ``requests``, the token sums (NULL when no row of the
        group reported the figure), ``total_tokens``, ``errors`` (upstream errors
        and client disconnects), ``refused`` (requests spendtap answered itself:
        budget, auth and ledger refusals, and an SDK's retries of them),
        ``usage_missing`` (served requests with no usage reported or estimated;
        refusals are never in it, nor in ``errors``),
        ``avg_ttft_s`` and ``avg_tokens_per_s`` (over the rows that have them),
        ``unpriced`` (rows with usage but no known price), ``cost_usd`` (the exact sum
        of the priced rows' costs, a ``Decimal``; None when none is priced) and
        ``avg_cost_usd`` (over the priced rows). Time groups are in time order unless
        ``sort`` says ``tokens``, ``cost`` or ``requests`` (most first); the others
        by total tokens unless ``sort`` says otherwise.
        """
        sql, params = report_sql(
            self.dialect, by, sort, since=since, until=until, account=account, key=key,
            model=model, node=node, outcome=outcome,
        )  # fmt: skip
        return [report_row(by, r) for r in self._rows(sql, params)]

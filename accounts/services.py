from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models import Case, Prefetch, Q, Value, When
from django.utils import timezone

from accounts.models import ApiToken, EffectivePolicy, QuotaPolicy, User
from nexcompute.tokens import lookup_of, new_token, token_matches

DEFAULT_POLICY_NAME = "default"


def default_policy() -> QuotaPolicy:
    """The policy for users in no policy group; created on first use, editable in admin."""
    policy = QuotaPolicy.objects.filter(is_default=True).first()
    if policy is None:
        policy, _ = QuotaPolicy.objects.get_or_create(
            name=DEFAULT_POLICY_NAME, defaults={"is_default": True}
        )
    return policy


def policy_for(user: User) -> EffectivePolicy:
    """The union of the policies of ``user``'s groups, or the default policy if none.

    Two queries (the policies, with a flag for the user's own; their lab ids): every session
    request asks this first.
    """
    lab_model = QuotaPolicy._meta.get_field("labs").related_model
    labs = Prefetch("labs", queryset=lab_model._default_manager.only("pk"))
    groups = user.groups.all()
    rows: list[Any] = list(
        QuotaPolicy.objects.filter(Q(group__in=groups) | Q(is_default=True))
        .annotate(of_user=Case(When(group__in=groups, then=Value(True)), default=Value(False)))
        .order_by("pk")
        .prefetch_related(labs)
    )
    policies = [p for p in rows if p.of_user] or [p for p in rows if p.is_default][:1]
    if not policies:  # no default policy yet: created on first use
        policies = [QuotaPolicy.objects.prefetch_related(labs).get(pk=default_policy().pk)]
    return EffectivePolicy(policies)


def api_token_create(*, user: User, name: str = "api") -> tuple[ApiToken, str]:
    """Create a personal API token. The clear token is returned once and never stored."""
    issued = new_token("nxp")
    token = ApiToken.objects.create(
        user=user, name=name, lookup=issued.lookup, digest=issued.digest
    )
    return token, issued.token


def api_token_authenticate(raw: str) -> User | None:
    # NUL cannot reach a PostgreSQL text comparison (it raises); no token contains one.
    if not raw or len(raw) > 200 or "\x00" in raw:
        return None
    for token in ApiToken.objects.filter(
        Q(lookup=lookup_of(raw)), revoked_at__isnull=True, user__is_active=True
    ).select_related("user"):
        if token_matches(raw, token.digest):
            # Cheap, lossy bookkeeping: no need to write on every request.
            now = timezone.now()
            if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
                ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
            return token.user
    return None


@transaction.atomic
def api_token_revoke(*, token: ApiToken) -> None:
    ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())


def login_unlock(*, username: str) -> int:
    """Staff: lift the lock django-axes put on ``username`` after too many wrong passwords.
    Returns the number of failure records removed (0: it was not locked)."""
    from axes.utils import reset

    return reset(username=username)

from __future__ import annotations

from typing import Any

from django.db import migrations


def create(apps: Any, schema_editor: Any) -> None:
    Group = apps.get_model("auth", "Group")
    QuotaPolicy = apps.get_model("accounts", "QuotaPolicy")
    for name in ("student", "staff"):
        Group.objects.get_or_create(name=name)
    if not QuotaPolicy.objects.filter(is_default=True).exists():
        QuotaPolicy.objects.get_or_create(name="default", defaults={"is_default": True})


class Migration(migrations.Migration):
    dependencies = [("accounts", "0002_initial"), ("auth", "0012_alter_user_first_name_max_length")]
    operations = [migrations.RunPython(create, migrations.RunPython.noop)]

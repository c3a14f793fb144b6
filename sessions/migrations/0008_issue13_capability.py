from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("compute_sessions", "0007_issue13_activity_source"),
    ]

    operations = [
        migrations.AddField(
            model_name="computesession",
            name="capability_hash",
            field=models.CharField(blank=True, max_length=64),
        ),
    ]

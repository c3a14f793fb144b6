from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("compute_sessions", "0005_unmet_request_and_report_indexes"),
    ]

    operations = [
        migrations.AddField(
            model_name="computesession",
            name="capability_hash",
            field=models.CharField(blank=True, max_length=64),
        ),
    ]

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("compute_sessions", "0006_issue13_session_mail"),
    ]

    operations = [
        migrations.AddField(
            model_name="computesession",
            name="activity_source",
            field=models.CharField(blank=True, max_length=20),
        ),
        migrations.AddField(
            model_name="computesession",
            name="activity_cpu_percent",
            field=models.FloatField(blank=True, null=True),
        ),
    ]

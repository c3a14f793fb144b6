from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("machines", "0006_machineevent_presence_index"),
    ]

    operations = [
        migrations.AddField(
            model_name="lab",
            name="warm_pool",
            field=models.BooleanField(
                default=True,
                help_text="Free machines keep one session sandbox ready (instant connect; costs "
                "the idle Jupyter's memory). Off: none is kept, and ready ones are wiped.",
            ),
        ),
        migrations.AddField(
            model_name="machine",
            name="warm_ready",
            field=models.BooleanField(default=False),
        ),
    ]

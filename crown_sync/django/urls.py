"""``path("_crown_sync/", include("crown_sync.django.urls"))``: the status view (opt-in)."""

from django.urls import path

from . import views

app_name = "crown_sync"

urlpatterns = [
    path("", views.status, name="status"),
]

from django.urls import include, path

from . import views

urlpatterns = [
    path("", views.index),
    path("run-now", views.run_now),
    path("_crown_sync/", include("crown_sync.django.urls")),  # status for load balancers
]

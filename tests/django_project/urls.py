from django.urls import include, path

from . import views

urlpatterns = [
    path("leader", views.leader),
    path("work", views.work),
    path("async-work", views.async_work),
    path("class-work", views.ClassWork.as_view()),
    path("async-class-work", views.AsyncClassWork.as_view()),
    path("method-decorated", views.MethodDecorated.as_view()),
    path("method-work", views.MethodWork.as_view()),
    path("_crown_sync/", include("crown_sync.django.urls")),
]

"""Views of every kind under ``leader_only``, and one that says what this process sees."""

import os

from django.http import JsonResponse
from django.utils.decorators import method_decorator
from django.views import View

import crown_sync.django
from crown_sync.django import leader_only


def leader(request):
    return JsonResponse({"is_leader": crown_sync.django.is_leader(), "pid": os.getpid()})


@leader_only
def work(request):
    return JsonResponse({"view": "function", "pid": os.getpid()})


@leader_only
async def async_work(request):
    return JsonResponse({"view": "async"})


@leader_only
class ClassWork(View):
    def get(self, request):
        return JsonResponse({"view": "class"})

    def post(self, request):
        return JsonResponse({"view": "class", "method": "post"})


@leader_only
class AsyncClassWork(View):
    async def get(self, request):
        return JsonResponse({"view": "async-class"})


@method_decorator(leader_only, name="dispatch")
class MethodDecorated(View):
    async def get(self, request):
        return JsonResponse({"view": "method-decorated"})


class MethodWork(View):
    @leader_only
    def get(self, request):
        return JsonResponse({"view": "method"})

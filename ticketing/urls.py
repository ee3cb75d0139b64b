from django.contrib import admin
from django.urls import path

from outbox.admin_views import operations_view
from outbox.views import metrics_view

admin.site.site_header = "Ticketing — outbox administration"
admin.site.site_title = "Ticketing admin"
admin.site.index_title = "Tickets, outbox and listeners"

urlpatterns = [
    path("admin/operations/", admin.site.admin_view(operations_view), name="operations"),
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),
]
